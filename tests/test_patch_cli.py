"""`jaxvla patch` from the command line: every arm on the paired contexts, with tiny budgets.

Its own file, the suite's longest, so that pytest-xdist starts it first (tests/conftest.py's LONGEST_FIRST);
tests/test_patch.py then reads the patching programs the two share from the compile cache.
"""

import dataclasses
import json

import pytest
from conftest import COMPILE_CACHE
from conftest import write_tiny_prior

import configs
from tools import patch as tools_patch
from tools import retrain as tools_retrain


@pytest.mark.slow
def test_every_arm_runs_from_the_command_line_on_the_paired_contexts(tmp_path, capsys):
    """`jaxvla patch debug` with tiny budgets: patching, full SFT, targeted SFT and HG-DAgger on deploy,
    each scored on the same test contexts; the report, JSON and plot are written. A rerun reads the
    finished seed back; a rerun under other settings refuses to mix them in."""
    write_tiny_prior(tmp_path / "prior")
    overrides = [
        *(
            "--patch.rounds 1 --patch.envs-per-round 4 --patch.updates-per-round 2 "
            "--target.eval-episodes 2 --patch.validation-episodes 2 --patch.offline-episodes 4 "
            "--patch.capacity 64 256 64 --patch.sft-demos 2 --patch.sft-steps 10 "
            "--patch.hg-dagger-rounds 1 --target.seeds 0 "
            "--sac.batch-size 16 --sac.utd 2 --sac.critic-warmup 2 --sac.critic-pretrain-steps 3"
        ).split(),
        *("--target.prior", str(tmp_path / "prior"), "--pretrain.data-dir", str(tmp_path / "data")),
        *("--out-dir", str(tmp_path / "runs"), "--compile-cache", str(COMPILE_CACHE)),
    ]
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

    # `jaxvla retrain` reads the run's takeovers back and scores the base at each operator share.
    retrain_args = [
        *"debug --patch.offline-episodes 4 --patch.sft-steps 10 --target.eval-episodes 2".split(),
        *"--patch.validation-episodes 2 --target.seeds 0 --shares 0 0.5".split(),
        *overrides[overrides.index("--target.prior") :],
    ]
    assert tools_retrain.main([*retrain_args, "--run", str(out)]) == 0
    table = capsys.readouterr().out.split("| share |")[1].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:4]] == ["0", "0.5"]
    with pytest.raises(SystemExit, match="no takeovers"):
        tools_retrain.main([*retrain_args, "--run", str(tmp_path)])
    with pytest.raises(SystemExit):
        tools_retrain.parse(["--run", str(out), "--shares", "0.5", "1"])
    assert "[0, 1)" in capsys.readouterr().err

    (out / "report.json").unlink()
    seed_result = out / "seed0" / tools_patch.SEED_RESULT
    before = seed_result.stat().st_mtime_ns
    assert tools_patch.main(["debug", *overrides]) == 0
    assert seed_result.stat().st_mtime_ns == before
    assert json.loads((out / "report.json").read_text())["seeds"] == report["seeds"]
    with pytest.raises(SystemExit, match="other settings"):
        tools_patch.main(["debug", *overrides, "--patch.sft-steps", "11"])


def test_a_seed_finished_before_the_target_and_operator_sections_is_still_read_back(tmp_path):
    """arms.json written when the prior, task, split, test contexts and operator triggers were `patch`
    settings (the operator's other fields and the operator's share of BC batches were not settings) matches
    a rerun of the same settings, and still refuses a rerun under other ones."""
    config = configs.get_config("debug")
    settings = json.loads(json.dumps(tools_patch.run_settings(config)))
    moved = {"prior", "task", "split", "eval_episodes"}
    triggers = {"slip", "force", "stall_steps", "disagreement", "lookahead", "calm_steps", "max_segment"}
    old_patch = {
        **{k: v for k, v in settings["patch"].items() if k != "operator_share"},  # added since
        "seeds": [0, 1, 2],
        **{k: v for k, v in settings["target"].items() if k in moved},
        **{k: v for k, v in settings["operator"].items() if k in triggers},
    }
    old = {k: v for k, v in settings.items() if k not in ("target", "operator")} | {"patch": old_patch}
    assert tools_patch.upgraded(old) == settings
    (tmp_path / tools_patch.SEED_RESULT).write_text(json.dumps({"settings": old, "arms": {}}))
    assert tools_patch.finished_seed(tmp_path, tools_patch.run_settings(config))["arms"] == {}
    for other in (
        dataclasses.replace(config, operator=dataclasses.replace(config.operator, slip=0.9)),
        dataclasses.replace(config, patch=dataclasses.replace(config.patch, operator_share=0.5)),
    ):
        with pytest.raises(SystemExit, match="other settings"):
            tools_patch.finished_seed(tmp_path, tools_patch.run_settings(other))
