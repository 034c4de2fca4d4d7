"""The C-MuJoCo twin: same scene and formulas as MJX, no jax, and the same episodes within tolerance."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import compiled_env

from envs.tasks import TASKS
from envs.twin import Twin

# Stated tolerances between MJX (float32, its own contact code) and C MuJoCo (float64) on one episode
# driven by identical actions. Measured: cup <= 0.2 mm, item <= 12 mm (it settles differently after the
# release), pressure <= 3.7 kPa at the instant the seal forms (the engines can form it a substep apart,
# shifting the pump transient) and 1.3 kPa on average over the unbox episode (the two engines seal at
# contact points millimetres apart, so the sealed level differs by ~2 % for the whole hold; 0 on the other
# tasks). Each stage is entered within a step in both engines, except "placed": a released item lands on
# MJX's softer contacts and rocks in the bin for a few steps before it counts as at rest (measured: 4
# steps on pick_place and sort, 1 on unbox), where C MuJoCo settles it at once.
CUP_TOL, ITEM_TOL, PRESSURE_PEAK_TOL, PRESSURE_MEAN_TOL = 1e-3, 2e-2, 5.0, 2.0
STAGE_LAG, SETTLE_LAG = 1, 6


def first_entries(stages):
    """Control step at which each stage is first entered."""
    return {stage: stages.index(stage) for stage in sorted(set(stages))}


def test_twin_never_imports_jax():
    code = "import sys, envs.twin; envs.twin.Twin('pick_place').reset(0); print('jax' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_twin_replays_an_mjx_episode_within_tolerance(task):
    env, twin = compiled_env(task), Twin(task)
    state = env.reset(jax.random.PRNGKey(7))
    mirror = twin.reset(params=jax.device_get(state.params))
    cup, item, pressure, stages, mirror_stages = [], [], [], [], []
    for _ in range(env.env.config.max_steps):
        action = env.operator_action(state)
        state, mirror = env.step(state, action), twin.step(np.asarray(action))
        ids = env.env.ids
        cup.append(
            np.abs(np.asarray(state.data.xpos[ids.gantry_body]) - mirror.data.xpos[ids.gantry_body]).max()
        )
        item.append(
            np.abs(np.asarray(state.data.xpos[ids.item_body]) - mirror.data.xpos[ids.item_body]).max()
        )
        pressure.append(abs(float(state.info["pressure"]) - float(mirror.info["pressure"])))
        stages.append(int(state.info["stage"]))
        mirror_stages.append(int(mirror.info["stage"]))
        if bool(state.done | state.truncated):
            break
    assert max(cup) < CUP_TOL and max(item) < ITEM_TOL
    assert max(pressure) < PRESSURE_PEAK_TOL and np.mean(pressure) < PRESSURE_MEAN_TOL
    entered, mirror_entered = first_entries(stages), first_entries(mirror_stages)
    assert entered.keys() == mirror_entered.keys()
    placed = max(entered)
    for stage, step in entered.items():
        assert abs(step - mirror_entered[stage]) <= (SETTLE_LAG if stage == placed else STAGE_LAG), stage
    assert bool(state.info["success"]) and bool(mirror.info["success"])


def test_twin_operator_succeeds_on_its_own():
    twin, successes = Twin("sort", "novel"), 0
    for seed in range(5):
        state = twin.reset(seed)
        while not (state.done or state.truncated):
            state = twin.step(twin.operator_action())
        successes += bool(state.info["success"])
    assert successes == 5
