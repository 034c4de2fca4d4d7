"""The patching loop: effort accounting, and a run that stops and resumes continues exactly."""

import dataclasses
import functools
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import write_tiny_state_pro
from flax import nnx

import configs
from envs.operator import Trigger
from envs.operator import takeover_alarm
from envs.operator import takeover_flags
from envs.operator import takeover_start
from jaxvla import normalization
from learner import bc
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
    assert patch.effort(block) == {
        "corrective_episodes": 1,
        "takeover_segments": 1,
        "takeover_steps": 2,
        "env_steps": 6,
    }


def test_segments_and_false_alarms_are_counted_per_run_of_operator_steps():
    # Episode 0: segments of 2 and 1 steps; episode 1: none; episode 2: one of 3 steps running to the end.
    intervention = np.array([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0], [0, 0, 1, 1, 1]], bool)
    assert patch.takeover_segments(intervention) == [2, 1, 3]
    block = {"intervention": intervention, "valid": np.ones((3, 5), bool)}
    # Replayed alone, episode 0 would have succeeded: its takeovers were a false alarm; episode 2's were not.
    counts = patch.effort(block, solo_success=np.array([True, True, False]))
    assert counts == {
        "corrective_episodes": 2,
        "takeover_segments": 3,
        "takeover_steps": 6,
        "env_steps": 15,
        "false_alarms": 1,
    }
    totals = patch.add_effort(dict(patch.ZERO_EFFORT), counts, patch.takeover_segments(intervention))
    shown = patch.effort_record(totals)
    assert shown["false_alarm_rate"] == 0.5 and shown["median_segment_steps"] == 2.0


def test_hg_dagger_learns_the_operator_steps_only():
    # One episode of 5 steps, chunk 2; the operator drove steps 1 and 2, the policy the rest.
    block = {
        "obs": {"proprio": np.arange(5, dtype=np.float32)[None, :, None]},
        "action": np.arange(5, dtype=np.float32)[None, :, None] * 10,
        "intervention": np.array([[0, 1, 1, 0, 0]], bool),
        "valid": np.ones((1, 5), bool),
    }
    examples = patch.intervention_examples(block, chunk=2)
    np.testing.assert_array_equal(examples["obs"]["proprio"][:, 0], [1, 2])
    np.testing.assert_array_equal(examples["chunk"][:, :, 0], [[10, 20], [20, 30]])
    # Step 2's chunk runs into step 3, which the policy executed: masked out of the BC loss.
    np.testing.assert_array_equal(examples["mask"], [[True, True], [True, False]])


def test_retraining_draws_the_operator_share_from_the_operators_examples_only():
    # 5 offline examples labelled -1, 2 of the operator's labelled +1: at share 0.25, a quarter of every
    # batch is the operator's, the rest the offline ones; without offline examples all are the operator's.
    def examples(count, label):
        return {
            "obs": {"proprio": np.zeros((count, 1), np.float32)},
            "chunk": np.full((count, 2, 1), label, np.float32),
            "mask": np.ones((count, 2), bool),
        }

    data = patch.retraining_data(examples(5, -1.0), examples(2, 1.0))
    assert (len(data["chunk"]), int(data["focus"]), int(data["size"])) == (8, 5, 7)
    batch = bc.focused_sampler(0.25)(jax.tree.map(jnp.asarray, data), jax.random.key(0), 64)
    np.testing.assert_array_equal(batch["chunk"][:, 0, 0], [-1.0] * 48 + [1.0] * 16)
    assert int(patch.retraining_data(None, examples(2, 1.0))["focus"]) == 0


def test_takeover_hands_back_after_calm_steps_or_the_segment_cap():
    trigger = Trigger(calm_steps=2, max_segment=4, calm_slip=0.5)
    start = {**takeover_start(np), "stage": np.int32(1), "slip": np.float32(0.0)}

    def step(info, alarm, slip=0.0):
        info = {**info, "slip": np.float32(slip)}
        return {**info, **takeover_flags(np, trigger, info, np.bool_(alarm), np.int32(1), np.bool_(False))}

    # An alarm, then two calm steps: the operator drives 3 steps and hands back on the third.
    info, history = start, []
    for alarm in (True, False, False):
        info = step(info, alarm)
        history.append((bool(info["is_intervention"]), bool(info["intervening"])))
    assert history == [(True, True), (True, True), (True, False)]
    # Without an alarm but with the held load at 0.7 of the hold, no step is calm: only the cap hands back.
    info, lengths = start, []
    for alarm in (True, False, False, False):
        info = step(info, alarm, slip=0.7)
        lengths.append(int(info["segment_steps"]))
    assert lengths == [1, 2, 3, 0] and not bool(info["intervening"])
    # A failure event is an alarm at once.
    quiet = {"events": np.zeros(7, bool), "slip": np.float32(0.2), "contact_force": np.float32(0.0)}
    action = np.zeros(4, np.float32)
    assert not takeover_alarm(np, trigger, {**info, **quiet}, action, action)
    assert takeover_alarm(np, trigger, {**info, **quiet, "events": np.eye(7, dtype=bool)[2]}, action, action)


def test_the_disagreement_trigger_ignores_the_valve():
    trigger = Trigger(disagreement=0.5)
    info = {
        **takeover_start(np),
        "stage": np.int32(0),
        "events": np.zeros(7, bool),
        "slip": np.float32(0),
        "contact_force": np.float32(0),
    }
    policy, operator = np.array([0.1, 0, 0, -1], np.float32), np.array([0.1, 0, 0, 1], np.float32)
    assert not takeover_alarm(np, trigger, info, policy, operator)
    assert takeover_alarm(np, trigger, info, policy + np.array([0.6, 0, 0, 0], np.float32), operator)


def test_seed_summary_reads_effort_on_validation_and_headlines_the_final_test_figure():
    fields = (
        "success_rate",
        "validation_success",
        "episodes",
        "corrective_episodes",
        "takeover_segments",
        "takeover_steps",
        "env_steps",
        "wall_s",
    )
    rounds = [
        (0.70, 0.72, 256, 0, 0, 0, 0, 0.0),
        (0.85, 0.91, 256, 10, 12, 90, 500, 9.0),
        (0.95, 0.93, 256, 16, 20, 120, 900, 20.0),
        (0.93, 0.94, 256, 20, 25, 150, 1300, 31.0),
    ]
    patching = [dict(zip(fields, values, strict=True)) for values in rounds]
    for record in patching:
        record.update(
            recovery_rate=0.5,
            retries_per_episode=0.1,
            cycle_time_s=3.0,
            by_component={"train": {"success_rate": 0.97}},
        )
    sft = [
        {**patching[0], "validation_success": 0.8, "corrective_episodes": 32, "takeover_steps": 1200},
        {**patching[0], "validation_success": 0.92, "corrective_episodes": 64, "takeover_steps": 2500},
    ]
    summary = seed_summary({"patch": patching, "sft": sft}, goal=0.9)
    # The goal is read on validation (round 1), never on the test contexts (round 2 would be 0.95).
    assert summary["patch"]["corrective_episodes_to_goal"] == 10
    assert summary["patch"]["final"] == 0.93 and summary["patch"]["last3_mean"] == pytest.approx(0.91)
    lo, hi = summary["patch"]["final_ci"]
    assert lo < 0.93 < hi and hi - lo < 0.07  # Wilson at 238 / 256
    assert summary["sft"]["corrective_episodes_over_patch"] == 6.4  # 64 / 10
    assert summary["sft"]["takeover_steps_over_patch"] == pytest.approx(2500 / 90)
    assert summary["patch"]["train_component"] == 0.97


def test_the_gate_publishes_unless_validation_drops_by_more_than_the_margin():
    assert patch.gate_passes(0.88, 0.90, margin=0.02)
    assert patch.gate_passes(0.95, 0.90, margin=0.0)
    assert not patch.gate_passes(0.87, 0.90, margin=0.02)


def test_the_gates_tolerance_scales_like_the_standard_error_so_one_context_of_32_passes():
    assert patch.gate_tolerance(0.02, 128) == pytest.approx(0.02)
    assert patch.gate_tolerance(0.02, 32) == pytest.approx(0.04)
    # The demo's case: candidates at 26 of 32 against the prior's 27 of 32.
    assert patch.gate_passes(26 / 32, 27 / 32, patch.gate_tolerance(0.02, 32))
    assert not patch.gate_passes(25 / 32, 27 / 32, patch.gate_tolerance(0.02, 32))


def tiny_prior(config: configs.Config, run_dir: pathlib.Path) -> Prior:
    """An untrained debug policy with statistics from fake observations: enough to drive the loop."""
    model = config.model
    graphdef, params = nnx.split(model.create_policy(0), nnx.Param)
    stats = normalization.compute(jax.device_get(model.fake_observation(jax.random.key(0), 256)))
    return Prior(model, "test", graphdef, params, stats, 0, run_dir)


def tiny_patching(**patch_fields) -> configs.Config:
    """The debug config with a patching run a test can afford: 2 rounds of 4 episodes, 2 updates each."""
    base = configs.get_config("debug")
    patching = dataclasses.replace(
        base.patch,
        rounds=2,
        envs_per_round=4,
        updates_per_round=2,
        validation_episodes=2,
        capacity=(64, 256, 64),
        **patch_fields,
    )
    sac = dataclasses.replace(base.sac, batch_size=16, utd=2, critic_warmup=2, critic_pretrain_steps=3)
    target = dataclasses.replace(base.target, eval_episodes=2)
    return dataclasses.replace(base, target=target, patch=patching, sac=sac)


@pytest.mark.slow
def test_a_resumed_run_with_a_refreshed_pro_reward_continues_exactly(tmp_path):
    # The base's retraining has its own test below.
    config = tiny_patching(reward="pro", pro=str(tmp_path / "pro"), base="prior")
    config = dataclasses.replace(config, pro=dataclasses.replace(config.pro, batch_size=8, refresh_steps=2))
    prior = tiny_prior(config, tmp_path / "prior")
    write_tiny_state_pro(tmp_path / "pro", prior.stats)  # the run reads its net from the checkpoint
    programs = patch.Programs.build(config, prior)
    run = functools.partial(patch.run_patching, config, prior, [], tmp_path, seed=0, programs=programs)
    straight, params = run(progress=False)
    # PRO was refreshed on each round's episodes; the resumed run must restore the refreshed PRO, or
    # round 2's shaped rewards, and so its critic loss, would differ.
    assert all(np.isfinite(r["pro_refresh_loss"]) for r in straight[1:])
    # Every program compiled in round 1 is reused: round 2 compiles nothing, nor does a later run (another
    # seed, or this one resumed) that shares the programs.
    assert straight[1]["compile_s"] > 0 and straight[2]["compile_s"] == 0

    # As if the learner had died before saving round 2: it resumes from round 1 and redoes round 2.
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    resumed, resumed_params = run(progress=False)
    assert resumed[2]["compile_s"] == 0

    logged = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(logged) == 4, "the resumed run should redo round 2 only"
    assert len(straight) == len(resumed) == 3
    for a, b in zip(straight, resumed, strict=True):
        assert a["corrective_episodes"] == b["corrective_episodes"] and a["env_steps"] == b["env_steps"]
        assert a["success_rate"] == b["success_rate"]
    assert straight[-1]["critic_loss"] == pytest.approx(resumed[-1]["critic_loss"], rel=1e-6)
    assert straight[-1]["pro_refresh_loss"] == pytest.approx(resumed[-1]["pro_refresh_loss"], rel=1e-6)
    assert straight[1]["critic_pretrain_loss_last"] == resumed[1]["critic_pretrain_loss_last"]
    assert [r["published"] for r in straight] == [r["published"] for r in resumed]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(resumed_params))


@pytest.mark.slow
def test_a_base_retrained_on_every_takeover_so_far_resumes_exactly(tmp_path):
    config = tiny_patching(base="hg_dagger", sft_steps=4)
    config = dataclasses.replace(
        config, pretrain=dataclasses.replace(config.pretrain, batch_size=8, log_every=2)
    )
    prior = tiny_prior(config, tmp_path / "prior")
    programs = patch.Programs.build(config, prior)
    run = functools.partial(patch.run_patching, config, prior, [], tmp_path, seed=0, programs=programs)
    straight, params = run(progress=False)
    assert straight[-1]["takeover_steps"] > 0, "an untrained policy should call the operator"

    # The base is BC on every round's takeover steps, not the prior and not the last round's alone.
    saved = sorted((tmp_path / "takeovers").glob("round*.npz"))
    rounds = [dict(np.load(path)) for path in saved]
    assert len(rounds) == 2
    assert sum(len(r["chunk"]) for r in rounds) == straight[-1]["takeover_steps"]
    examples = {
        "obs": {
            k.removeprefix("obs."): np.concatenate([r[k] for r in rounds]) for k in rounds[0] if "." in k
        },
        "chunk": np.concatenate([r["chunk"] for r in rounds]),
        "mask": np.concatenate([r["mask"] for r in rounds]),
    }
    expected = patch.Retrainer(config, prior)(None, examples, seed=0)
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        jax.device_get(params["prior"]),
        jax.device_get(expected),
    )
    assert not np.allclose(
        jax.tree.leaves(jax.device_get(params["prior"]))[0], jax.tree.leaves(jax.device_get(prior.params))[0]
    )

    # Killed before saving round 2: the resumed run reads round 1's takeovers back and ends the same.
    shutil.rmtree(tmp_path / "checkpoints" / "2")
    resumed, resumed_params = run(progress=False)
    assert resumed[2]["compile_s"] == 0
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(resumed_params))
