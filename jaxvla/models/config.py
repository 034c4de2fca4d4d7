"""`ModelConfig`: one frozen description that builds every network and says what it reads.

The same fields travel in an export's manifest (`to_dict` / `from_dict`), so the numpy client rebuilds the
forward pass from them without importing this module.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvla import tokenizer
from jaxvla.models import encoders
from jaxvla.models import heads
from jaxvla.schema import OBSERVATION_SPEC
from jaxvla.schema import STATE_KEYS
from jaxvla.schema import STATE_SIZE

# The float vectors the networks read: key -> shape. The image appears only for camera models.
STATE_SHAPES = {key: OBSERVATION_SPEC[key].shape for key in STATE_KEYS}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes and options of the policy, critic and value networks."""

    encoder: Literal["state", "transformer"] = "state"
    """"state": LayerNorm MLP + prompt embedding (+ depth CNN); "transformer": VLA-style token trunk."""
    width: int = 256
    """Hidden width of encoders and heads (the transformer's model width)."""
    depth: int = 2
    """Hidden layers in each head's MLP."""
    prompt_dim: int = 32
    """Prompt embedding size (state encoder)."""
    image: bool = False
    """Read the RGB-D camera: a depth CNN (state encoder) or RGB-D patch tokens (transformer)."""
    image_res: int = 32
    """Camera image height and width in pixels."""
    cnn_channels: tuple[int, ...] = (16, 32)
    """Channels of the depth CNN's stride-2 convolutions."""
    patch_size: int = 8
    """Patch size [pixels] of the transformer's image tokens."""
    layers: int = 2
    """Transformer blocks."""
    attention_heads: int = 4
    """Attention heads per transformer block."""
    mlp_ratio: int = 4
    """Transformer MLP width as a multiple of `width`."""
    attention: Literal["xla", "cudnn"] = "xla"
    """The transformer's attention kernel (`jax.nn.dot_product_attention`'s implementation); "cudnn" is
    the fused kernel, for NVIDIA GPUs and bf16 only."""
    remat: bool = False
    """Recompute each transformer block's activations in the backward pass: less memory, more FLOPs."""
    chunk: int = 4
    """Actions per predicted chunk (H)."""
    action_size: int = 4
    """Action dimensions ([dx, dy, dz, suction] in the workcell)."""
    advantage_conditioned: bool = False
    """Give the policy Recap's advantage-indicator input."""
    ensemble: int = 2
    """Critic ensemble size."""
    value_bins: int = 201
    """Bins of the distributional value."""
    value_range: tuple[float, float] = (-1.0, 0.0)
    """Support of the distributional value (Recap: normalised steps-to-success, failures at the bottom)."""
    log_std_range: tuple[float, float] = (-5.0, 1.0)
    """Bounds of the policy's log standard deviation."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Compute dtype; parameters stay float32."""

    # ---------------------------------------------------------------------------------------- build
    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def feature_size(self) -> int:
        return self.width

    def create_encoder(self, rngs: nnx.Rngs) -> nnx.Module:
        if self.encoder == "state":
            channels = self.cnn_channels if self.image else None
            return encoders.StateEncoder(
                STATE_SIZE, self.width, self.prompt_dim, channels, dtype=self.compute_dtype, rngs=rngs
            )
        if self.encoder == "transformer":
            return encoders.TransformerEncoder(
                STATE_SIZE,
                self.width,
                self.layers,
                self.attention_heads,
                self.mlp_ratio,
                self.image_res if self.image else None,
                self.patch_size,
                attention=self.attention,
                remat=self.remat,
                dtype=self.compute_dtype,
                rngs=rngs,
            )
        raise ValueError(f"unknown encoder {self.encoder!r}; choose 'state' or 'transformer'")

    def create_policy(self, seed: int = 0) -> heads.Policy:
        return heads.Policy(self, rngs=nnx.Rngs(seed))

    def create_critic(self, seed: int = 0) -> heads.CriticEnsemble:
        return heads.CriticEnsemble(self, rngs=nnx.Rngs(seed))

    def create_residual_policy(self, seed: int = 0) -> heads.ResidualPolicy:
        return heads.ResidualPolicy(self, rngs=nnx.Rngs(seed))

    def create_action_critic(self, seed: int = 0) -> heads.ActionCritic:
        return heads.ActionCritic(self, rngs=nnx.Rngs(seed))

    def create_value(self, seed: int = 0) -> heads.DistributionalValue:
        return heads.DistributionalValue(self, rngs=nnx.Rngs(seed))

    def value_support(self) -> jax.Array:
        """[bins] bin centres, evenly spaced over `value_range`."""
        return jnp.linspace(*self.value_range, self.value_bins)

    # --------------------------------------------------------------------------------------- inputs
    def observation_spec(self, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
        """What the networks read: key -> [batch, ...] shape and dtype."""
        spec = {k: jax.ShapeDtypeStruct((batch, *shape), jnp.float32) for k, shape in STATE_SHAPES.items()}
        spec["prompt"] = jax.ShapeDtypeStruct((batch, tokenizer.PROMPT_LENGTH), jnp.int32)
        if self.image:
            spec["image"] = jax.ShapeDtypeStruct((batch, self.image_res, self.image_res, 4), jnp.float32)
        return spec

    def chunk_spec(self, batch: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((batch, self.chunk, self.action_size), jnp.float32)

    def fake_observation(self, key: jax.Array, batch: int) -> dict[str, jax.Array]:
        """A random observation batch with the right shapes: standard normals and real prompt words."""
        spec = self.observation_spec(batch)
        keys = dict(zip(spec, jax.random.split(key, len(spec)), strict=True))
        obs = {k: jax.random.normal(keys[k], s.shape, s.dtype) for k, s in spec.items() if k != "prompt"}
        key_words, key_lengths = jax.random.split(keys["prompt"])
        words = jax.random.randint(key_words, spec["prompt"].shape, 2, len(tokenizer.VOCABULARY))
        lengths = jax.random.randint(key_lengths, (batch, 1), 1, tokenizer.PROMPT_LENGTH + 1)
        obs["prompt"] = jnp.where(jnp.arange(tokenizer.PROMPT_LENGTH) < lengths, words, tokenizer.PAD)
        return obs

    def fake_chunk(self, key: jax.Array, batch: int) -> jax.Array:
        return jax.random.uniform(key, self.chunk_spec(batch).shape, minval=-1.0, maxval=1.0)

    # ------------------------------------------------------------------------------------ manifests
    def to_dict(self) -> dict:
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "ModelConfig":
        """Also reads manifests and checkpoints written before `patch` was renamed `patch_size`."""
        fields = dict(fields)
        if "patch" in fields:
            fields["patch_size"] = fields.pop("patch")
        return fields_from_dict(cls, fields)


def fields_to_dict(config) -> dict:
    """A frozen config dataclass as a manifest's JSON fields (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def fields_from_dict(cls, fields: dict):
    """`fields_to_dict`'s inverse; an unknown field is an error, a missing one keeps its default."""
    unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def count_params(module: nnx.Module) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, nnx.Param))))
