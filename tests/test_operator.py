"""The scripted operator's success per task and split (slow, still in the suite).

The suite runs 64 episodes per task and split to stay inside CI's time; the figures in the README and the
closing notes are over 200: `JAXVLA_OPERATOR_EPISODES=200 pytest -s -m slow tests/test_operator.py`.
"""

import os

import jax
import numpy as np
import pytest
from conftest import fewest_successes

from envs import rollout
from envs.tasks import TASKS
from envs.workcell import Workcell
from jaxvla import schema

EPISODES = int(os.environ.get("JAXVLA_OPERATOR_EPISODES", 64))
# The success rate the operator is held to. A 64-episode count of an operator at 97% falls under 95% often,
# so the test asks only that the count is consistent with these rates (see `fewest_successes`).
TARGET = {"train": 0.95, "novel": 0.90}


def operator_outcomes(env: Workcell, key: jax.Array, episodes: int) -> dict:
    """Final info of `episodes` operator episodes, run as one vmapped scan."""

    @jax.jit
    def run(key):
        states = jax.vmap(env.reset)(jax.random.split(key, episodes))
        policy = lambda s, k: jax.vmap(env.operator_action)(s)  # noqa: E731
        return rollout.rollout(jax.vmap(env.step), policy, states, key, env.config.max_steps)[0].info

    return jax.device_get(run(key))


@pytest.mark.slow
@pytest.mark.parametrize("split", sorted(TARGET))
@pytest.mark.parametrize("task", sorted(TASKS))
def test_operator_solves_the_task(task, split):
    info = operator_outcomes(Workcell(task, split), jax.random.PRNGKey(2026), EPISODES)
    successes = int(info["success"].sum())
    counts = np.bincount(info["failure_mode"], minlength=len(schema.FAILURE_MODES)).tolist()
    modes = dict(zip(schema.FAILURE_MODES, counts, strict=True))
    print(f"{task}/{split}: operator success {successes}/{EPISODES}; failure modes {modes}")
    assert successes >= fewest_successes(EPISODES, TARGET[split]), modes
