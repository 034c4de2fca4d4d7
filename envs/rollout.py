"""Rollouts as one `lax.scan`: Python sees whole episodes, never single steps."""

from collections.abc import Callable

import jax
import jax.numpy as jnp

from envs.workcell import State

Policy = Callable[[State, jax.Array], jax.Array]  # (state, key) -> action [A]


def freeze_when_done(old: State, new: State) -> State:
    """Keeps a finished episode's last state, so the final info of every env in a batch survives."""
    finished = old.done | old.truncated  # [] or [B]

    def pick(a, b):
        return jnp.where(finished.reshape(finished.shape + (1,) * (a.ndim - finished.ndim)), a, b)

    return jax.tree.map(pick, old, new)


def rollout(
    step: Callable[[State, jax.Array], State],
    policy: Policy,
    state: State,
    key: jax.Array,
    length: int,
    *,
    freeze: bool = True,
) -> tuple[State, dict]:
    """Runs `length` steps of `policy` in one scan. Works for a single env or a vmapped batch.

    Returns the last state and the per-step record {obs, action, reward, done, truncated, info}, each
    with a leading time axis [T, ...]; records after an episode ended repeat its last values when frozen.
    """

    def body(state, key_t):
        action = policy(state, key_t)
        new = step(state, action)
        if freeze:
            new = freeze_when_done(state, new)
        record = {
            "obs": state.obs,
            "action": action,
            "reward": new.reward,
            "done": new.done,
            "truncated": new.truncated,
            "info": new.info,
        }
        return new, record

    return jax.lax.scan(body, state, jax.random.split(key, length))
