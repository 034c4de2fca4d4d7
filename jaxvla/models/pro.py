"""The Process-Reward Operator (Cortex 1.6): progress, termination and risk from a window of telemetry.

Per step, the encoders turn the observation (proprioception and telemetry through a LayerNorm MLP, the
goal prompt, optionally the depth image) into one fused token; the embedding of the action chunk executed
from that step (unless `action_input` is off) and the elapsed time are concatenated to it. One causal
self-attention block then reads, at each step t, the tokens of steps t-W+1..t (a band mask), and three
heads read its output:

- progress: a distributional value V(s_t) over `value_bins` bins (logits);
- termination: d_t = P(done at t) and q_t = P(success | done at t) (two logits);
- risk: a categorical over "none" and each failure mode within the next Δ steps (logits).

Why attention and not a recurrent cell: with one block and a band mask, step t's outputs depend on exactly
the last W steps, so scoring a whole episode in one pass gives the same numbers as scoring each window
alone (tested), training on sampled windows is parallel over the window, and ranking K candidate chunks
reruns only a [K, W] batch. A recurrent state would carry the whole past and make window training and
whole-episode scoring disagree. The elapsed-time feature doubles as the position signal.
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvla.models import encoders
from jaxvla.models import layers
from jaxvla.models.config import fields_from_dict
from jaxvla.models.config import fields_to_dict
from jaxvla.schema import STATE_SIZE


@dataclasses.dataclass(frozen=True)
class ProNetConfig:
    """Sizes of the process-reward network. Kept small on purpose: a critic that must generalise."""

    width: int = 128
    """Width of the fused token and the temporal block."""
    prompt_dim: int = 16
    """Goal-prompt embedding size."""
    action_width: int = 32
    """Width of the action-chunk embedding."""
    window: int = 16
    """Steps the temporal model reads (W): 1.6 s at the workcell's 10 Hz."""
    heads: int = 4
    """Attention heads."""
    mlp_ratio: int = 2
    """Width of the attention block's MLP, as a multiple of `width`."""
    chunk: int = 4
    """Actions per embedded chunk (the policy's H)."""
    action_size: int = 4
    """Action dimensions."""
    value_bins: int = 51
    """Bins of the distributional progress value."""
    value_range: tuple[float, float] = (-1.5, 1.5)
    """Support of the progress value, in units of the implicit reward (success +1, failure -1)."""
    risk_classes: int = 7
    """"none" plus each failure mode (jaxvla.schema.FAILURE_MODES, in its order)."""
    time_scale: float = 100.0
    """Steps per unit of the elapsed-time feature."""
    image: bool = False
    """Read the depth image through a small CNN adapter."""
    action_input: bool = True
    """Embed the executed chunk into each token. Off: every head reads states only, so V is a potential
    Φ(s) for reward shaping and ρ a state risk for the takeover trigger. On: V(s, a) can rank chunks."""
    cnn_channels: tuple[int, ...] = (16, 32)
    """Channels of the depth adapter's stride-2 convolutions."""

    def create(self, seed: int = 0) -> "ProcessRewardModel":
        return ProcessRewardModel(self, rngs=nnx.Rngs(seed))

    def support(self) -> jax.Array:
        return jnp.linspace(*self.value_range, self.value_bins)

    def to_dict(self) -> dict:
        return fields_to_dict(self)

    @classmethod
    def from_dict(cls, fields: dict) -> "ProNetConfig":
        return fields_from_dict(cls, fields)


def band_mask(valid: jax.Array, window: int) -> jax.Array:
    """[B, T] valid steps -> [B, T, T] attention mask: query t reads valid keys t-window+1..t.

    The diagonal is always open so a padding query still has one key (its outputs are masked later).
    """
    t = jnp.arange(valid.shape[-1])
    age = t[:, None] - t[None, :]
    band = (age >= 0) & (age < window)
    return (band & valid[..., None, :]) | jnp.eye(valid.shape[-1], dtype=bool)


class ProcessRewardModel(nnx.Module):
    """(obs {k: [B, T, ...]}, chunks [B, T, H, A], steps [B, T], valid [B, T]) -> logits per step."""

    def __init__(self, config: ProNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        channels = config.cnn_channels if config.image else None
        w = config.width
        self.encoder = encoders.StateEncoder(
            STATE_SIZE, w, config.prompt_dim, channels, dtype=jnp.float32, rngs=rngs
        )
        action_width = config.action_width if config.action_input else 0
        if config.action_input:
            self.action = layers.MLP(
                config.chunk * config.action_size, (config.action_width,), dtype=None, rngs=rngs
            )
        self.fuse = nnx.Linear(w + action_width + 1, w, rngs=rngs)
        self.temporal = layers.TransformerBlock(w, config.heads, config.mlp_ratio, dtype=None, rngs=rngs)
        self.norm = nnx.LayerNorm(w, epsilon=layers.LAYER_NORM_EPS, rngs=rngs)
        self.value = nnx.Linear(w, config.value_bins, rngs=rngs)
        self.termination = nnx.Linear(w, 2, rngs=rngs)
        self.risk = nnx.Linear(w, config.risk_classes, rngs=rngs)

    def tokens(self, obs: dict, chunks: jax.Array, steps: jax.Array) -> jax.Array:
        """The fused per-step tokens [B, T, width]; `chunks` is ignored without `action_input`."""
        b, t = steps.shape
        flat = {k: v.reshape(b * t, *v.shape[2:]) for k, v in obs.items()}
        parts = [self.encoder(flat).reshape(b, t, -1)]
        if self.config.action_input:
            parts.append(self.action(chunks.reshape(b, t, -1)))
        parts.append((steps.astype(jnp.float32) / self.config.time_scale)[..., None])
        return self.fuse(jnp.concatenate(parts, axis=-1))

    def __call__(self, obs: dict, chunks: jax.Array, steps: jax.Array, valid: jax.Array) -> dict:
        x = self.temporal(self.tokens(obs, chunks, steps), band_mask(valid, self.config.window))
        x = self.norm(x)
        done, success = jnp.moveaxis(self.termination(x), -1, 0)
        return {"value": self.value(x), "done": done, "success": success, "risk": self.risk(x)}


def readouts(logits: dict, support: jax.Array) -> dict:
    """Logits -> the quantities the uses read: V (expected value), d, q, rho (P(any failure within Δ)),
    and the risk distribution."""
    risk = jax.nn.softmax(logits["risk"], axis=-1)
    return {
        "value": jnp.sum(jax.nn.softmax(logits["value"], axis=-1) * support, axis=-1),
        "done": jax.nn.sigmoid(logits["done"]),
        "success": jax.nn.sigmoid(logits["success"]),
        "rho": 1.0 - risk[..., 0],
        "risk": risk,
    }
