"""`jaxvla compare`: paired patching runs side by side; unpaired ones refused."""

import json
import pathlib

import pytest

from tools import compare


def record(round_: int, success: float, validation: float) -> dict:
    return {
        "round": round_,
        "success_rate": success,
        "validation_success": validation,
        "episodes": 64,
        "by_component": {"train": {"success_rate": success + 0.05}},
        "recovery_rate": 0.5,
        "retries_per_episode": 3.0,
        "cycle_time_s": 4.0,
        "corrective_episodes": 4 * round_,
        "takeover_segments": 5 * round_,
        "takeover_steps": 30 * round_,
        "env_steps": 600 * round_,
        "wall_s": 10.0 * round_,
    }


def write_run(
    folder: pathlib.Path, validations: dict[str, list[float]], test_seed: int = 7, finals: dict | None = None
) -> pathlib.Path:
    """A patch report.json: per seed, the patch arm's records with these validation successes; test
    success rises 10 points a round, to the seed's entry in `finals` where it has one."""
    seeds = {
        seed: {"patch": [record(i, 0.5 + 0.1 * i, v) for i, v in enumerate(values)]}
        for seed, values in validations.items()
    }
    for seed, final in (finals or {}).items():
        seeds[seed]["patch"][-1]["success_rate"] = final
    patch = {"task": "pick_place", "split": "deploy", "eval_episodes": 64, "validation_episodes": 64}
    report = {
        "config": {"patch": patch, "test_seed": test_seed, "validation_seed": 11},
        "seeds": seeds,
        "novel_final": {seed: {"patch": 0.0} for seed in seeds},
    }
    folder.mkdir(parents=True)
    (folder / "report.json").write_text(json.dumps(report))
    return folder


def test_runs_are_compared_seed_by_seed_with_their_effort_to_the_goal(tmp_path):
    fast = write_run(tmp_path / "fast", {"0": [0.5, 0.92, 0.95], "1": [0.5, 0.8, 0.91]})
    slow = write_run(tmp_path / "slow", {"0": [0.5, 0.6, 0.7], "1": [0.5, 0.7, 0.93]})
    out = tmp_path / "out"
    assert compare.main([f"fast={fast}", f"slow={slow}", "--out", str(out), "--goal", "0.9"]) == 0
    text = (out / "compare.md").read_text()
    assert "| fast | 0, 1 | 70.0 / 70.0 |" in text  # every seed's final success
    # fast reaches the goal at 600 and 1,200 env steps; slow's seed 0 never does.
    fast_row = [line for line in text.splitlines() if line.startswith("| fast | 70.0 [")][0]
    assert "| 900 [600, 1,200] |" in fast_row
    slow_row = [line for line in text.splitlines() if line.startswith("| slow | 70.0 [")][0]
    assert "| 1,200 (1/2 seeds) |" in slow_row
    assert (out / "compare.png").stat().st_size > 0


def test_later_runs_are_paired_seed_by_seed_with_the_first(tmp_path):
    validations = {"0": [0.5, 0.8, 0.92], "1": [0.5, 0.8, 0.85], "2": [0.5, 0.9, 0.9]}
    first = write_run(tmp_path / "first", validations)
    later = write_run(
        tmp_path / "later",
        {"0": [0.5, 0.95, 0.96], "1": [0.5, 0.91, 0.97], "3": [0.5, 0.5, 0.5]},
        finals={"0": 0.8, "1": 0.75},
    )
    out = tmp_path / "out"
    assert compare.main([f"first={first}", f"later={later}", "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "Paired by seed with first" in text
    # Seeds 0 and 1 are shared; finals 80 and 75 against 70 and 70.
    row = [line for line in text.splitlines() if line.startswith("| later | 2 |")][0]
    assert row.startswith("| later | 2 | +7.5 [+5.0, +10.0] |")
    # Seed 0 reaches 90% on validation at 600 env steps against 1,200; in seed 1 only the later run does.
    assert "| 0.50 (1/2 seeds) |" in row


def test_runs_on_other_contexts_are_refused(tmp_path):
    one = write_run(tmp_path / "one", {"0": [0.5, 0.6]})
    other = write_run(tmp_path / "other", {"0": [0.5, 0.6]}, test_seed=8)
    with pytest.raises(SystemExit, match="test_seed: 7 vs 8"):
        compare.main([f"one={one}", f"other={other}", "--out", str(tmp_path / "out")])


def test_a_folder_without_a_report_is_named(tmp_path):
    with pytest.raises(SystemExit, match="report.json does not exist"):
        compare.main([f"x={tmp_path}", "--out", str(tmp_path / "out")])


def test_a_report_from_before_the_target_section_pairs_with_a_new_one(tmp_path):
    old = json.loads((write_run(tmp_path / "old", {"0": [0.5]}) / "report.json").read_text())
    target = {k: old["config"]["patch"].pop(k) for k in ("task", "split", "eval_episodes")}
    new = {**old, "config": {**old["config"], "target": target, "operator": {}}}
    assert compare.pairing_key(new) == compare.pairing_key(
        json.loads((tmp_path / "old" / "report.json").read_text())
    )
