"""The tanh-squashed diagonal Gaussian over action chunks, as plain functions of (mean, log_std).

Actions live in [-1, 1]; u ~ N(mean, std) is squashed by a = tanh(u). Log-probabilities sum over every
action dimension of the chunk, so one number scores a whole chunk (what SAC and PPO-style updates need).
"""

import jax
import jax.numpy as jnp

# Demonstrated actions sit on the bounds (a saturated command, a closed valve) where atanh is infinite.
ACTION_CLIP = 1.0 - 1e-3


def _squash_log_det(u: jax.Array) -> jax.Array:
    """log |d tanh(u) / du| = log(1 - tanh(u)^2), written stably: 2 (log 2 - u - softplus(-2u))."""
    return 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))


def _gaussian_log_prob(u: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    z = (u - mean) * jnp.exp(-log_std)
    return -0.5 * z**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)


def mode(mean: jax.Array) -> jax.Array:
    """The deterministic action: tanh(mean). [..., H, A]."""
    return jnp.tanh(mean)


def sample_pre_tanh(key: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """u ~ N(mean, std) [..., H, A], the chunk before the squash (the action is tanh(u)).

    Policy-gradient ratios score u itself: a saturated action rounds to +-1 in float32 and its atanh is
    lost, while the squash's log-determinant does not depend on the parameters and cancels in a ratio.
    """
    return mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape, mean.dtype)


def pre_tanh_log_prob_terms(mean: jax.Array, log_std: jax.Array, u: jax.Array) -> jax.Array:
    """Per-dimension Gaussian log-densities [..., H, A] of pre-squash samples u."""
    return _gaussian_log_prob(u, mean, log_std)


def sample(key: jax.Array, mean: jax.Array, log_std: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A reparameterised chunk and its log-probability: ([..., H, A], [...])."""
    u = sample_pre_tanh(key, mean, log_std)
    log_prob = _gaussian_log_prob(u, mean, log_std) - _squash_log_det(u)
    return jnp.tanh(u), jnp.sum(log_prob, axis=(-2, -1))


def log_prob_terms(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """Per-dimension log-densities [..., H, A] of a given chunk in [-1, 1]; bounds clipped to ACTION_CLIP."""
    u = jnp.arctanh(jnp.clip(action, -ACTION_CLIP, ACTION_CLIP))
    return _gaussian_log_prob(u, mean, log_std) - _squash_log_det(u)


def log_prob(mean: jax.Array, log_std: jax.Array, action: jax.Array) -> jax.Array:
    """log pi(action) of a whole chunk [..., H, A] -> [...]."""
    return jnp.sum(log_prob_terms(mean, log_std, action), axis=(-2, -1))


def guided_mean(conditioned: jax.Array, unconditioned: jax.Array, beta: float) -> jax.Array:
    """Classifier-free guidance of the pre-tanh mean: mu_u + beta (mu_c - mu_u). [..., H, A].

    The mean of pi_u^(1 - beta) pi_c^beta for Gaussians of equal std (Recap Eq. 2 with the policy's std
    kept): beta 1 is the conditioned policy, beta > 1 pushes further along the indicator's direction.
    """
    return unconditioned + beta * (conditioned - unconditioned)
