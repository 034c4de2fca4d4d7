"""Evaluation figures by hand, and the whole prior pipeline from the command line."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import COMPILE_CACHE

from jaxvla.schema import FAILURE_MODES
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
        "--pretrain.tasks",
        "pick_place",
        "--pretrain.eval-every",
        "0",
        "--pretrain.eval-episodes",
        "2",
        "--pretrain.data-dir",
        str(tmp_path / "data"),
        "--out-dir",
        str(tmp_path / "runs"),
        "--compile-cache",
        str(COMPILE_CACHE),
    ]
    out = run("pretrain", "debug", *overrides, cwd=repo)
    run_dir = tmp_path / "runs" / "debug"
    assert "pick_place" in out and (run_dir / "training.png").exists()
    report = json.loads((run_dir / "report.json").read_text())
    assert {(r["task"], r["split"]) for r in report["evaluation"]} == {
        ("pick_place", "train"),
        ("pick_place", "novel"),
    }
    assert report["step"] == 40

    out = run(
        "eval",
        "--policy",
        str(run_dir),
        "--task",
        "pick_place",
        "--split",
        "deploy",
        "--episodes",
        "8",
        "--json",
        str(tmp_path / "eval.json"),
        cwd=repo,
    )
    evaluation = json.loads((tmp_path / "eval.json").read_text())["evaluation"]
    assert evaluation[0]["episodes"] == 8 and 0.0 <= evaluation[0]["success_rate"] <= 1.0
    by_component = evaluation[0]["by_component"]
    assert set(by_component) == {"train", "physics", "layout"} and "- physics" in out
    assert sum(c["episodes"] for c in by_component.values()) == 8

    out = run("export", "--policy", str(run_dir), cwd=repo)
    files = sorted((run_dir / "export").glob("policy-v*.msgpack"))
    assert len(files) == 1 and files[0].name in out

    run(
        "twin",
        "--policy",
        str(files[0]),
        "--task",
        "pick_place",
        "--split",
        "train",
        "--episodes",
        "1",
        "--json",
        str(tmp_path / "twin.json"),
        cwd=repo,
    )
    twin = json.loads((tmp_path / "twin.json").read_text())
    assert twin["summary"]["episodes"] == 1 and twin["policy_version"] == 40


def test_summary_breaks_success_and_failures_down_by_component():
    outcomes = {
        "success": np.array([True, False, True, False, False]),
        "failure_mode": np.array([0, DROP, 0, MISSED, DROP]),
        "retries": np.zeros(5),
        "had_failure": np.zeros(5, bool),
        "cycle_time": np.full(5, 3.0, np.float32),
        "component": np.array([0, 0, 0, 1, 1]),
    }
    r = evaluate.summarize(outcomes, ("train", "physics", "layout"))
    train, physics, layout = (r["by_component"][k] for k in ("train", "physics", "layout"))
    assert (train["episodes"], train["success_rate"], train["failure_modes"]) == (3, 2 / 3, {"drop": 1})
    assert (physics["failures"], physics["failure_modes"]) == (2, {"drop": 1, "missed_grasp": 1})
    assert layout == {"episodes": 0, "success_rate": None, "failures": 0, "failure_modes": {}}
    table = evaluate.format_table({("pick_place", "deploy"): r})
    assert "- physics" in table and "- layout" in table


def test_wilson_interval_by_hand():
    # 8 of 10 at z = 1.96: centre (p + z^2 / 2n) / (1 + z^2 / n),
    # half-width z sqrt(p q / n + z^2 / 4n^2) / (1 + z^2 / n)
    lo, hi = evaluate.wilson_interval(8, 10)
    z = 1.959964
    centre = (0.8 + z**2 / 20) / (1 + z**2 / 10)
    half = z * np.sqrt(0.8 * 0.2 / 10 + z**2 / 400) / (1 + z**2 / 10)
    assert (lo, hi) == pytest.approx((centre - half, centre + half), abs=1e-6)
    assert evaluate.wilson_interval(0, 50)[0] == 0.0 and evaluate.wilson_interval(50, 50)[1] == 1.0
    records = [{"success_rate": s, "episodes": 10} for s in (0.2, 0.9, 0.6, 0.8)]
    assert evaluate.headline(records)["last3_mean"] == pytest.approx((0.9 + 0.6 + 0.8) / 3)


def test_bootstrap_interval_brackets_the_mean_of_the_seeds():
    lo, hi = evaluate.bootstrap_interval([0.7, 0.8, 0.9])
    assert 0.7 - 1e-9 <= lo < 0.8 < hi <= 0.9 + 1e-9
    assert (
        evaluate.bootstrap_interval([0.5, None]) == (0.5, 0.5) and evaluate.bootstrap_interval([None]) is None
    )


def test_test_and_validation_contexts_are_fixed_and_disjoint():
    from conftest import compiled_env

    env = compiled_env("pick_place", "deploy")

    def starts() -> np.ndarray:
        """Both sets' item starts, test then validation: one batch, so one compiled reset."""
        keys = [evaluate.context_keys(contexts) for contexts in (evaluate.TEST, evaluate.VALIDATION)]
        return np.asarray(jax.vmap(env.reset)(jnp.concatenate(keys)).params.item_start)

    both = starts()
    test, validation = np.split(both, [evaluate.TEST.episodes])
    assert len(test) >= 256 and len(validation) >= 128
    np.testing.assert_array_equal(both, starts())  # every method and round sees these
    shared = {tuple(x) for x in test.round(6)} & {tuple(x) for x in validation.round(6)}
    assert not shared
