"""Observation encoders: normalised observation dict -> one feature vector per example.

Two families share one interface, `encoder(obs) -> [B, F]`:
- `StateEncoder` (the default, CPU-sized): an MLP with LayerNorm over proprioception, telemetry, item and
  scene features; a bag-of-words prompt embedding; optionally a small CNN over the depth channel.
- `TransformerEncoder` (VLA-scale): RGB-D patches, prompt words and the state vector become tokens of
  one transformer; a learned readout token is the feature.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvla import tokenizer
from jaxvla.models.layers import ACTIVATION
from jaxvla.models.layers import LAYER_NORM_EPS
from jaxvla.models.layers import MLP
from jaxvla.models.layers import TransformerBlock
from jaxvla.schema import STATE_KEYS


def state_vector(obs: dict) -> jax.Array:
    """[B, S]: the float observation vectors side by side."""
    return jnp.concatenate([obs[k] for k in STATE_KEYS], axis=-1)


def prompt_mask(prompt: jax.Array) -> jax.Array:
    """[B, L] bool: True on real words, False on padding."""
    return prompt != tokenizer.PAD


class PromptEmbedding(nnx.Module):
    """Bag of words: the mean embedding of a prompt's words. prompt [B, L] int -> [B, dim]."""

    def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embed = nnx.Embed(len(tokenizer.VOCABULARY), dim, dtype=dtype, rngs=rngs)

    def __call__(self, prompt: jax.Array) -> jax.Array:
        mask = prompt_mask(prompt)[..., None].astype(self.embed.dtype or jnp.float32)
        return jnp.sum(self.embed(prompt) * mask, axis=-2) / jnp.maximum(jnp.sum(mask, axis=-2), 1.0)


class DepthCNN(nnx.Module):
    """Depth image [B, H, W] -> [B, channels[-1]]: VALID 3x3 stride-2 convolutions, then a spatial mean."""

    def __init__(self, channels: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        sizes = (1, *channels)
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), strides=2, padding="VALID", dtype=dtype, rngs=rngs)
                for a, b in zip(sizes[:-1], sizes[1:], strict=True)
            ]
        )

    def __call__(self, depth: jax.Array) -> jax.Array:
        x = depth[..., None]
        for conv in self.convs:
            x = ACTIVATION(conv(x))
        return jnp.mean(x, axis=(-3, -2))


class StateEncoder(nnx.Module):
    """The default encoder: obs -> [B, width]."""

    def __init__(
        self,
        state_size: int,
        width: int,
        prompt_dim: int,
        cnn_channels: tuple[int, ...] | None,
        *,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.state = MLP(state_size, (width, width), dtype=dtype, rngs=rngs)
        self.prompt = PromptEmbedding(prompt_dim, dtype=dtype, rngs=rngs)
        self.depth = DepthCNN(cnn_channels, dtype=dtype, rngs=rngs) if cnn_channels else None
        fused = width + prompt_dim + (cnn_channels[-1] if cnn_channels else 0)
        self.fuse = MLP(fused, (width,), dtype=dtype, rngs=rngs)

    def __call__(self, obs: dict) -> jax.Array:
        parts = [self.state(state_vector(obs)), self.prompt(obs["prompt"])]
        if self.depth is not None:
            parts.append(self.depth(obs["image"][..., 3]))
        return self.fuse(jnp.concatenate(parts, axis=-1))


class TransformerEncoder(nnx.Module):
    """The VLA-scale encoder: [readout, state, prompt words, RGB-D patches] tokens -> readout [B, width]."""

    def __init__(
        self,
        state_size: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: int,
        image_res: int | None,
        patch: int,
        *,
        attention: str = "xla",
        remat: bool = False,
        dtype,
        rngs: nnx.Rngs,
    ):
        self.patch = patch
        self.remat = remat
        self.num_patches = (image_res // patch) ** 2 if image_res else 0
        if image_res and image_res % patch:
            raise ValueError(f"image size {image_res} is not a multiple of the patch size {patch}")
        num_tokens = 2 + tokenizer.PROMPT_LENGTH + self.num_patches
        self.readout = nnx.Param(jax.random.normal(rngs.params(), (width,)) * 0.02)
        self.position = nnx.Param(jax.random.normal(rngs.params(), (num_tokens, width)) * 0.02)
        self.state = nnx.Linear(state_size, width, dtype=dtype, rngs=rngs)
        self.words = nnx.Embed(len(tokenizer.VOCABULARY), width, dtype=dtype, rngs=rngs)
        self.patches = nnx.Linear(patch * patch * 4, width, dtype=dtype, rngs=rngs) if image_res else None
        self.blocks = nnx.List(
            [
                TransformerBlock(width, heads, mlp_ratio, dtype=dtype, rngs=rngs, attention=attention)
                for _ in range(layers)
            ]
        )
        self.norm = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, obs: dict) -> jax.Array:
        batch = obs["prompt"].shape[0]
        readout = jnp.broadcast_to(self.readout[...].astype(self.dtype), (batch, 1, self.readout.shape[0]))
        tokens = [readout, self.state(state_vector(obs))[:, None], self.words(obs["prompt"])]
        mask = [jnp.ones((batch, 2), bool), prompt_mask(obs["prompt"])]
        if self.patches is not None:
            tokens.append(self.patches(patchify(obs["image"], self.patch)))
            mask.append(jnp.ones((batch, self.num_patches), bool))
        x = jnp.concatenate(tokens, axis=1) + self.position[...].astype(self.dtype)
        mask = jnp.concatenate(mask, axis=1)
        for block in self.blocks:
            x = nnx.remat(call_block)(block, x, mask) if self.remat else block(x, mask)
        return self.norm(x[:, 0])


def call_block(block: TransformerBlock, x: jax.Array, mask: jax.Array) -> jax.Array:
    return block(x, mask)


def patchify(image: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], row-major over patches."""
    b, h, w, c = image.shape
    x = image.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)
