"""The patching loop: effort accounting, and a run that stops and resumes continues exactly."""

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from jaxvla import normalization
from learner import patch
from learner.pretrain import Prior
from tools.patch import seed_summary


def test_episode_block_stops_at_the_first_end_and_counts_effort():
    # Two envs, four steps. Env 0 ends at step 1 (later steps are frozen copies); env 1 runs to the end
    # with the operator in control at steps 2 and 3.
    done = jnp.array([[0, 0], [1, 0], [1, 0], [1, 0]], bool)
    intervention = jnp.array([[0, 0], [0, 0], [1, 1], [0, 1]], bool)
    record = {
        "obs": {"proprio": jnp.zeros((4, 2, 3))},
        "reward": jnp.zeros((4, 2)),
        "done": done,
        "truncated": jnp.zeros((4, 2), bool),
        "info": {"action": jnp.zeros((4, 2, 5)), "is_intervention": intervention},
    }
    block = patch.episode_block(record, version=3)
    np.testing.assert_array_equal(block["valid"], [[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(block["terminal"], [[0, 1, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(block["intervention"], [[0, 0, 0, 0], [0, 0, 1, 1]])
    assert block["obs"]["proprio"].shape == (2, 4, 3) and int(block["version"][0, 0]) == 3
    assert patch.effort(block) == {"corrective_episodes": 1, "takeover_steps": 2, "env_steps": 6}


def test_seed_summary_compares_effort_at_the_same_success():
    fields = ("success_rate", "corrective_episodes", "takeover_steps", "env_steps", "wall_s")
    rounds = [(0.0, 0, 0, 0, 0.0), (0.5, 10, 90, 500, 9.0), (0.96, 16, 120, 900, 20.0)]
    patching = [dict(zip(fields, values, strict=True)) for values in rounds]
    for record in patching:
        record.update(retries_per_episode=0.0, cycle_time_s=3.0, recovery_rate=0.0, throughput_per_hour=1.0,
                      failure_modes={})  # fmt: skip
    sft = [
        {"success_rate": 0.9, "corrective_episodes": 32, "takeover_steps": 1200},
        {"success_rate": 0.97, "corrective_episodes": 64, "takeover_steps": 2500},
    ]
    summary = seed_summary(patching, sft, train_success=0.9)
    assert summary["goal_success"] == 0.95
    assert summary["patch_corrective_episodes_to_goal"] == 16 and summary["sft_demos_to_goal"] == 64
    assert summary["effort_ratio_sft_over_patch"] == 4.0 and summary["sft_operator_steps_to_goal"] == 2500
    # Short of 95%, the goal is the best patching reached: SFT is compared at that success.
    summary = seed_summary(patching[:2], sft, train_success=0.9)
    assert summary["goal_success"] == 0.5 and summary["sft_demos_to_goal"] == 32


def tiny_prior(config: configs.Config, run_dir: pathlib.Path) -> Prior:
    """An untrained debug policy with statistics from fake observations: enough to drive the loop."""
    model = config.model
    graphdef, params = nnx.split(model.create_policy(0), nnx.Param)
    stats = normalization.compute(jax.device_get(model.fake_observation(jax.random.key(0), 256)))
    return Prior(config, graphdef, params, stats, 0, run_dir)


@pytest.mark.slow
def test_a_resumed_run_continues_exactly(tmp_path):
    base = configs.get_config("debug")
    patching = dataclasses.replace(base.patch, rounds=2, envs_per_round=4, updates_per_round=2,
                                   eval_episodes=2, capacity=(64, 256, 64))  # fmt: skip
    sac = dataclasses.replace(base.sac, batch_size=16, utd=2, critic_warmup=2)
    config = dataclasses.replace(base, patch=patching, sac=sac)
    prior = tiny_prior(config, tmp_path / "prior")
    straight, params = patch.run_patching(config, prior, [], tmp_path, seed=0, progress=False)

    # As if the learner had died before saving round 2: it resumes from round 1 and redoes round 2.
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    resumed, resumed_params = patch.run_patching(config, prior, [], tmp_path, seed=0, progress=False)

    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 4, "the resumed run should redo round 2 only"
    assert len(straight) == len(resumed) == 3
    for a, b in zip(straight, resumed, strict=True):
        assert a["corrective_episodes"] == b["corrective_episodes"] and a["env_steps"] == b["env_steps"]
        assert a["success_rate"] == b["success_rate"]
    assert straight[-1]["critic_loss"] == pytest.approx(resumed[-1]["critic_loss"], rel=1e-6)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(resumed_params))
