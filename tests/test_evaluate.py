"""Evaluation figures by hand, and the whole prior pipeline from the command line."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from envs.cell import FAILURE_MODES
from learner import evaluate

DROP, MISSED = FAILURE_MODES.index("drop"), FAILURE_MODES.index("missed_grasp")


def test_summary_by_hand():
    outcomes = {
        "success": np.array([True, True, False, False]),
        "failure_mode": np.array([0, 0, DROP, MISSED]),
        "retries": np.array([0, 2, 1, 3]),
        "had_failure": np.array([False, True, True, True]),
        "cycle_time": np.array([3.0, 5.0, 4.0, 12.0], np.float32),
    }
    r = evaluate.summarize(outcomes)
    assert r["success_rate"] == 0.5
    assert r["failure_modes"] == {"drop": 1, "missed_grasp": 1}
    assert r["retries_per_episode"] == 1.5  # (0 + 2 + 1 + 3) / 4
    assert r["cycle_time_s"] == 4.0  # successes only: (3 + 5) / 2
    assert r["recovery_rate"] == pytest.approx(1 / 3)  # one of the three with a failure succeeded
    assert r["throughput_per_hour"] == pytest.approx(2 / (24.0 / 3600))  # 2 successes in 24 s
    assert "drop 1" in evaluate.format_table({("pick_place", "train"): r})


def run(*args: str, cwd) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "jaxvla.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_pretrain_eval_export_twin_from_the_command_line(tmp_path):
    """debug config, one task: demonstrations -> BC -> MJX eval -> export -> numpy actor in the C twin."""
    repo = pathlib.Path(__file__).resolve().parent.parent
    overrides = [
        "--pretrain.tasks", "pick_place", "--pretrain.eval-every", "0", "--pretrain.eval-episodes", "2",
        "--pretrain.data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "runs"),
        "--compile-cache", str(repo / ".cache" / "jax"),
    ]  # fmt: skip
    out = run("pretrain", "debug", *overrides, cwd=repo)
    run_dir = tmp_path / "runs" / "debug"
    assert "pick_place" in out and (run_dir / "training.png").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert {(r["task"], r["split"]) for r in report["evaluation"]} == {
        ("pick_place", "train"),
        ("pick_place", "novel"),
    }
    assert report["step"] == 40

    run("eval", "--policy", str(run_dir), "--task", "pick_place", "--split", "train", "--episodes", "2",
        "--json", str(tmp_path / "eval.json"), cwd=repo)  # fmt: skip
    evaluation = json.loads((tmp_path / "eval.json").read_text())["evaluation"]
    assert evaluation[0]["episodes"] == 2 and 0.0 <= evaluation[0]["success_rate"] <= 1.0

    out = run("export", "--policy", str(run_dir), cwd=repo)
    files = sorted((run_dir / "export").glob("policy-v*.msgpack"))
    assert len(files) == 1 and files[0].name in out

    run("twin", "--policy", str(files[0]), "--task", "pick_place", "--split", "train", "--episodes", "1",
        "--json", str(tmp_path / "twin.json"), cwd=repo)  # fmt: skip
    twin = json.loads((tmp_path / "twin.json").read_text())
    assert twin["summary"]["episodes"] == 1 and twin["policy_version"] == 40
