"""Every failure mode, produced by a situation built on purpose (the operator drives up to the moment)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from conftest import compiled_env

from envs import cell as C
from jaxvla import schema

EVENT = {name: i for i, name in enumerate(schema.EVENTS)}
HOLD_STILL = jnp.array([0.0, 0.0, 0.0, 1.0])


def _run(env, state, policy, steps):
    """Steps `policy(state) -> action` until the episode ends or `policy` returns None; the last state."""
    for _ in range(steps):
        action = policy(state)
        if action is None:
            break
        state = env.step(state, action)
        if bool(state.done | state.truncated):
            break
    return state


def _held(state):
    return int(state.cell.grip) == C.GRIP_ITEM


def _until_held(env):
    return lambda s: None if _held(s) else env.operator_action(s)


def _with_params(env, key, **changes):
    params = env.env.sample_params(key)
    return env.reset_from_params(key, params._replace(**{k: jnp.float32(v) for k, v in changes.items()}))


def test_heavy_porous_item_lifted_fast_slips():
    env = compiled_env("pick_place")
    state = _with_params(env, jax.random.PRNGKey(0), item_mass=2.0, porosity=0.5, item_friction=0.4)
    state = _run(env, state, _until_held(env), 60)
    assert _held(state)
    slipped = []
    for _ in range(8):  # full speed up and sideways: inertial load on top of the weight
        state = env.step(state, jnp.array([1.0, 0.0, 1.0, 1.0]))
        slipped.append(bool(state.info["events"][EVENT["slip"]]))
        if slipped[-1]:
            break
    assert any(slipped)
    assert int(state.info["failure_mode"]) == C.SLIP
    assert not _held(state)


def test_gentle_lift_of_the_same_item_holds():
    env = compiled_env("pick_place")
    state = _with_params(env, jax.random.PRNGKey(0), item_mass=2.0, porosity=0.5, item_friction=0.4)
    state = _run(env, state, _until_held(env), 60)
    state = _run(env, state, lambda s: jnp.array([0.0, 0.0, 0.1, 1.0]), 8)
    assert _held(state) and int(state.info["failure_mode"]) == C.NONE


def test_release_over_the_wrong_compartment_is_wrong_bin():
    env = compiled_env("sort")
    state = env.reset(jax.random.PRNGKey(2))
    wrong = (int(state.params.target) + 1) % 3

    def misled(s):  # the operator, told the wrong compartment
        return env.operator_action(dataclasses.replace(s, params=s.params._replace(target=jnp.int32(wrong))))

    state = _run(env, state, misled, 120)
    assert bool(state.done) and not bool(state.info["success"])
    assert int(state.info["failure_mode"]) == C.WRONG_BIN


def test_release_above_the_floor_between_tote_and_bin_is_a_drop():
    env = compiled_env("pick_place")
    state = env.reset(jax.random.PRNGKey(1))
    state = _run(
        env,
        state,
        lambda s: None if _held(s) and float(s.obs["item"][0]) > 0.2 else env.operator_action(s),
        80,
    )
    state = _run(env, state, lambda s: HOLD_STILL, 3)
    state = _run(env, state, lambda s: jnp.array([0.0, 0.0, 0.0, -1.0]), 30)
    assert bool(state.done)
    assert int(state.info["failure_mode"]) == C.DROP


def test_suction_off_without_a_seal_is_a_missed_grasp_and_the_next_attempt_a_retry():
    env = compiled_env("pick_place")
    state = env.reset(jax.random.PRNGKey(0))
    state = env.step(state, HOLD_STILL)  # valve open in mid-air: no seal
    state = env.step(state, jnp.array([0.0, 0.0, 0.0, -1.0]))
    assert bool(state.info["events"][EVENT["missed_grasp"]])
    assert int(state.info["failure_mode"]) == C.MISSED_GRASP
    state = env.step(state, HOLD_STILL)
    assert bool(state.info["events"][EVENT["retry"]]) and int(state.info["retries"]) == 1


def test_pressing_the_cup_into_the_item_is_a_collision():
    env = compiled_env("pick_place")
    state = env.reset(jax.random.PRNGKey(0))
    state = _run(env, state, lambda s: None if float(s.info["pressure"]) > 5 else env.operator_action(s), 60)
    state = _run(env, state, lambda s: jnp.array([0.0, 0.0, -1.0, -1.0]), 5)
    assert bool(state.info["events"][EVENT["collision"]])
    assert int(state.info["failure_mode"]) == C.COLLISION and bool(state.done)


def test_doing_nothing_times_out():
    env = compiled_env("pick_place")
    state = env.reset(jax.random.PRNGKey(0))
    state = _run(env, state, lambda s: jnp.zeros(4), env.env.config.max_steps + 1)
    assert bool(state.truncated) and not bool(state.done)
    assert int(state.info["failure_mode"]) == C.TIMEOUT


def test_operator_episode_ends_in_success_with_no_failure():
    env = compiled_env("unbox")
    state = _run(env, env.reset(jax.random.PRNGKey(5)), env.operator_action, env.env.config.max_steps)
    assert bool(state.info["success"]) and int(state.info["failure_mode"]) == C.NONE
    assert int(state.info["stage"]) == len(env.env.spec.stages) - 1
    assert np.isclose(float(state.reward), 1.0)
