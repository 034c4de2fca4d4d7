"""`jaxvla patch` from the command line: every arm on the paired contexts, with tiny budgets.

Its own file so that pytest-xdist runs it beside tests/test_patch.py rather than after it: both compile
the patching programs, and together they are the suite's longest stretch.
"""

import json

import pytest
from conftest import COMPILE_CACHE
from conftest import write_tiny_prior

from tools import patch as tools_patch


@pytest.mark.slow
def test_every_arm_runs_from_the_command_line_on_the_paired_contexts(tmp_path):
    """`jaxvla patch debug` with tiny budgets: patching, full SFT, targeted SFT and HG-DAgger on deploy,
    each scored on the same test contexts; the report, JSON and plot are written. A rerun reads the
    finished seed back; a rerun under other settings refuses to mix them in."""
    write_tiny_prior(tmp_path / "prior")
    overrides = [
        "--patch.prior", str(tmp_path / "prior"), "--patch.rounds", "1", "--patch.envs-per-round", "4",
        "--patch.updates-per-round", "2", "--patch.eval-episodes", "2", "--patch.validation-episodes", "2",
        "--patch.offline-episodes", "4", "--patch.capacity", "64", "256", "64", "--patch.sft-demos", "2",
        "--patch.sft-steps", "10", "--patch.hg-dagger-rounds", "1", "--patch.seeds", "0",
        "--sac.batch-size", "16", "--sac.utd", "2", "--sac.critic-warmup", "2",
        "--sac.critic-pretrain-steps", "3", "--pretrain.data-dir", str(tmp_path / "data"),
        "--out-dir", str(tmp_path / "runs"),
        "--compile-cache", str(COMPILE_CACHE),
    ]  # fmt: skip
    assert tools_patch.main(["debug", *overrides]) == 0
    out = tmp_path / "runs" / "patch-pick_place-deploy"
    report = json.loads((out / "report.json").read_text())
    arms = report["seeds"]["0"]
    assert set(arms) == {"patch", "sft", "targeted_sft", "hg_dagger"}
    firsts = [records[0] for records in arms.values()]
    assert {(r["contexts"], r["contexts_seed"], r["episodes"]) for r in firsts} == {("test", 20_261_129, 2)}
    assert all(set(r["by_component"]) == {"train", "physics", "layout"} for r in firsts)
    assert arms["hg_dagger"][-1]["round"] == 1 and arms["sft"][-1]["corrective_episodes"] == 2
    # The residual's reach over the round's operator steps is recorded (shares, so within [0, 1]).
    assert 0 <= arms["patch"][-1]["operator_share_outside"] <= 1
    text = (out / "report.md").read_text()
    for title in tools_patch.ARMS.values():
        assert title in text
    assert (out / "patch.png").stat().st_size > 0 and "novel" in text

    (out / "report.json").unlink()
    seed_result = out / "seed0" / tools_patch.SEED_RESULT
    before = seed_result.stat().st_mtime_ns
    assert tools_patch.main(["debug", *overrides]) == 0
    assert seed_result.stat().st_mtime_ns == before
    assert json.loads((out / "report.json").read_text())["seeds"] == report["seeds"]
    with pytest.raises(SystemExit, match="other settings"):
        tools_patch.main(["debug", *overrides, "--patch.sft-steps", "11"])
