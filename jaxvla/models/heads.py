"""The three networks the learner trains: policy, critic ensemble and distributional value.

Each owns its encoder (actor and critic features are not shared, as in SAC and RLPD), so each can be
exported, frozen or reset on its own. `config` is a `ModelConfig`; it picks the encoder and the sizes.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxvla.models.layers import MLP
from jaxvla.models.layers import EnsembleMLP
from jaxvla.schema import INDICATOR_NEGATIVE as INDICATOR_NEGATIVE
from jaxvla.schema import INDICATOR_NONE as INDICATOR_NONE
from jaxvla.schema import INDICATOR_POSITIVE as INDICATOR_POSITIVE
from jaxvla.schema import INDICATOR_VALUES


class Policy(nnx.Module):
    """obs (+ advantage indicator) -> tanh-Gaussian over an action chunk: mean, log_std [B, H, A]."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        dtype = config.compute_dtype
        self.chunk, self.action_size = config.chunk, config.action_size
        self.log_std_min, self.log_std_max = config.log_std_range
        self.encoder = config.create_encoder(rngs)
        width = config.feature_size
        conditioned = config.advantage_conditioned
        self.indicator = nnx.Embed(INDICATOR_VALUES, width, dtype=dtype, rngs=rngs) if conditioned else None
        self.trunk = MLP(width, (config.width,) * config.depth, dtype=dtype, rngs=rngs)
        self.head = nnx.Linear(config.width, 2 * config.chunk * config.action_size, dtype=dtype, rngs=rngs)

    def __call__(self, obs: dict, indicator: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        x = self.encoder(obs)
        if self.indicator is not None:
            # Absent means "no indicator" (INDICATOR_NONE): what classifier-free guidance contrasts against.
            x = x + self.indicator(jnp.zeros(x.shape[0], jnp.int32) if indicator is None else indicator)
        out = self.head(self.trunk(x)).astype(jnp.float32).reshape(-1, 2, self.chunk, self.action_size)
        # A smooth squash keeps log_std inside its range without the dead gradients of a clip.
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (jnp.tanh(out[:, 1]) + 1)
        return out[:, 0], log_std


class CriticEnsemble(nnx.Module):
    """(obs, action chunk [B, H, A]) -> Q [E, B], one row per ensemble member."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.encoder = config.create_encoder(rngs)
        in_features = config.feature_size + config.chunk * config.action_size
        widths = (config.width,) * config.depth
        self.q = EnsembleMLP(config.ensemble, in_features, widths, dtype=config.compute_dtype, rngs=rngs)

    def __call__(self, obs: dict, chunk: jax.Array) -> jax.Array:
        x = self.encoder(obs)
        x = jnp.concatenate([x, chunk.reshape(chunk.shape[0], -1).astype(x.dtype)], axis=-1)
        return self.q(x).astype(jnp.float32)


class ResidualPolicy(nnx.Module):
    """(obs, base action [B, A]) -> tanh-Gaussian over a one-step residual: mean, log_std [B, A].

    The head starts at zero, so the residual's mode tanh(0) = 0 and the executed action prior + scale x
    residual is exactly the prior's until the learner moves it (and log_std sits mid-range).
    """

    def __init__(self, config, *, rngs: nnx.Rngs):
        dtype = config.compute_dtype
        self.action_size = config.action_size
        self.log_std_min, self.log_std_max = config.log_std_range
        self.encoder = config.create_encoder(rngs)
        widths = (config.width,) * config.depth
        self.trunk = MLP(config.feature_size + config.action_size, widths, dtype=dtype, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        self.head = nnx.Linear(
            config.width, 2 * config.action_size, kernel_init=zeros, bias_init=zeros, dtype=dtype, rngs=rngs
        )

    def __call__(self, obs: dict, base: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.encoder(obs)
        x = jnp.concatenate([x, base.astype(x.dtype)], axis=-1)
        out = self.head(self.trunk(x)).astype(jnp.float32).reshape(-1, 2, self.action_size)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (jnp.tanh(out[:, 1]) + 1)
        return out[:, 0], log_std


class ActionCritic(nnx.Module):
    """(obs, executed action [B, A], base action [B, A]) -> Q [E, B]: the critic of one executed step.

    It sees the prior's action beside the executed one, so it can tell a correction from the prior's
    behaviour (ResFiT's critic input)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.encoder = config.create_encoder(rngs)
        in_features = config.feature_size + 2 * config.action_size
        widths = (config.width,) * config.depth
        self.q = EnsembleMLP(config.ensemble, in_features, widths, dtype=config.compute_dtype, rngs=rngs)

    def __call__(self, obs: dict, action: jax.Array, base: jax.Array) -> jax.Array:
        x = self.encoder(obs)
        x = jnp.concatenate([x, action.astype(x.dtype), base.astype(x.dtype)], axis=-1)
        return self.q(x).astype(jnp.float32)


class DistributionalValue(nnx.Module):
    """obs -> logits [B, bins] over `config.value_support()` (Recap's value, PRO's progress)."""

    def __init__(self, config, *, rngs: nnx.Rngs):
        self.encoder = config.create_encoder(rngs)
        self.trunk = MLP(
            config.feature_size, (config.width,) * config.depth, dtype=config.compute_dtype, rngs=rngs
        )
        self.head = nnx.Linear(config.width, config.value_bins, dtype=config.compute_dtype, rngs=rngs)

    def __call__(self, obs: dict) -> jax.Array:
        return self.head(self.trunk(self.encoder(obs))).astype(jnp.float32)


def expected_value(logits: jax.Array, support: jax.Array) -> jax.Array:
    """The mean of the categorical: [..., bins] -> [...]."""
    return jnp.sum(jax.nn.softmax(logits, axis=-1) * support, axis=-1)
