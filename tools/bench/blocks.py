"""The random rollout blocks the learner and replay sections fill their buffers with."""

import jax
import jax.numpy as jnp

from jaxvla import models
from learner import replay

BLOCK_ROWS, BLOCK_STEPS = 64, 120  # one rollout block per add: 64 envs x 120 control steps
EPISODE_STEPS = 100  # random blocks end about one episode per this many steps


def random_block(key: jax.Array, model: models.ModelConfig) -> dict:
    """A rollout block [BLOCK_ROWS, BLOCK_STEPS, ...] as `replay.insert` takes it: random observations and
    actions, every step valid, about one episode end per EPISODE_STEPS steps."""
    rows, steps = BLOCK_ROWS, BLOCK_STEPS
    key_obs, key_action, key_reward, key_end = jax.random.split(key, 4)
    obs = model.fake_observation(key_obs, rows * steps)
    terminal = jax.random.uniform(key_end, (rows, steps)) < 1.0 / EPISODE_STEPS
    return {
        "obs": {k: v.reshape(rows, steps, *v.shape[1:]) for k, v in obs.items()},
        "action": jax.random.uniform(key_action, (rows, steps, model.action_size), minval=-1.0, maxval=1.0),
        "reward": jax.random.normal(key_reward, (rows, steps)),
        "terminal": terminal,
        "valid": jnp.ones((rows, steps), bool),
        "is_first": jnp.concatenate([jnp.ones((rows, 1), bool), terminal[:, :-1]], axis=1),
        "intervention": jnp.zeros((rows, steps), bool),
        "version": jnp.zeros((rows, steps), jnp.int32),
        "reward_source": jnp.full((rows, steps), replay.OPERATOR_REWARD, jnp.int8),
    }
