"""Building blocks shared by every model: LayerNorm MLPs, an ensemble linear layer, a transformer block.

Each block uses only ops the numpy client re-implements in `jaxvla/actor/forward.py` (matmul, LayerNorm,
SiLU, softmax), so an exported network runs on a robot without jax.
"""

import jax
import jax.numpy as jnp
from flax import nnx

ACTIVATION = jax.nn.silu
LAYER_NORM_EPS = 1e-6


class MLP(nnx.Module):
    """[..., in] -> [..., widths[-1]]: (Linear -> LayerNorm -> SiLU) per width."""

    def __init__(self, in_features: int, widths: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        sizes = (in_features, *widths)
        self.linears = nnx.List(
            [nnx.Linear(a, b, dtype=dtype, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.norms = nnx.List(
            [nnx.LayerNorm(b, epsilon=LAYER_NORM_EPS, dtype=dtype, rngs=rngs) for b in widths]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = ACTIVATION(norm(linear(x)))
        return x


class EnsembleLinear(nnx.Module):
    """E independent linear maps in one einsum: [B, in] or [E, B, in] -> [E, B, out]."""

    def __init__(self, ensemble: int, in_features: int, out_features: int, *, dtype, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        self.kernel = nnx.Param(init(rngs.params(), (ensemble, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((ensemble, out_features)))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel, bias = self.kernel[...].astype(self.dtype), self.bias[...].astype(self.dtype)
        spec = "bi,eio->ebo" if x.ndim == 2 else "ebi,eio->ebo"
        return jnp.einsum(spec, x.astype(self.dtype), kernel) + bias[:, None, :]


class EnsembleMLP(nnx.Module):
    """E MLPs side by side, each ending in a scalar: [B, in] -> [E, B]."""

    def __init__(self, ensemble: int, in_features: int, widths: tuple[int, ...], *, dtype, rngs: nnx.Rngs):
        sizes = (in_features, *widths)
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.linears = nnx.List([EnsembleLinear(ensemble, a, b, dtype=dtype, rngs=rngs) for a, b in pairs])
        self.norms = nnx.List(
            [nnx.LayerNorm(b, epsilon=LAYER_NORM_EPS, dtype=dtype, rngs=rngs) for b in widths]
        )
        self.out = EnsembleLinear(ensemble, sizes[-1], 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # One LayerNorm per depth, shared by the members: it normalises each member's features separately
        # (the reduction is over the last axis), and its scale and bias are few parameters.
        for linear, norm in zip(self.linears, self.norms, strict=True):
            x = ACTIVATION(norm(linear(x)))
        return self.out(x)[..., 0]


class TransformerBlock(nnx.Module):
    """Pre-LayerNorm self-attention and MLP, both residual. x [B, N, D]; mask (True = attend) is [B, N]
    over keys, or [B, N, N] over (query, key) pairs (causal or banded attention)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, *, dtype, rngs: nnx.Rngs, attention="xla"):
        if width % heads:
            raise ValueError(f"transformer width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.attention = attention
        self.norm_attention = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.qkv = nnx.Linear(width, 3 * width, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(width, width, dtype=dtype, rngs=rngs)
        self.norm_mlp = nnx.LayerNorm(width, epsilon=LAYER_NORM_EPS, dtype=dtype, rngs=rngs)
        self.up = nnx.Linear(width, mlp_ratio * width, dtype=dtype, rngs=rngs)
        self.down = nnx.Linear(mlp_ratio * width, width, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        b, n, d = x.shape
        q, k, v = jnp.split(
            self.qkv(self.norm_attention(x)).reshape(b, n, 3 * self.heads, d // self.heads), 3, 2
        )
        mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None, :, :]
        if self.attention == "cudnn":  # cuDNN reads a mask over every (query, key) pair
            mask = jnp.broadcast_to(mask, (b, 1, n, n))
        attended = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention)
        x = x + self.out(attended.reshape(b, n, d))
        return x + self.down(ACTIVATION(self.up(self.norm_mlp(x))))
