"""`jaxvla demo`: the comparison's figures by hand, stages that run once, and the fleet stage for real
(the service and numpy actors as processes on loopback, a tiny untrained prior).

The method stages call the learners the other test files cover; the whole command is measured by running
it (README, "The main job").
"""

import dataclasses
import json

import pytest
from conftest import write_tiny_prior

import configs
from jaxvla import episodes as rlds
from learner import pretrain
from tools import demo


def record(success: float, env_steps: int, wall_s: float, **extra) -> dict:
    return {"success_rate": success, "recovery_rate": 0.5, "retries_per_episode": 1.0, "cycle_time_s": 3.0,
            "throughput_per_hour": 100.0, "env_steps": env_steps, "wall_s": wall_s, **extra}  # fmt: skip


def test_convergence_is_the_first_evaluation_near_the_best_and_absent_without_a_gain():
    run = [record(0.0, 0, 0.0), record(0.5, 100, 10.0), record(0.85, 200, 20.0), record(0.9, 300, 30.0)]
    assert demo.converged_at(run, 0.9) is run[2]  # 0.85 >= 0.9 * 0.9
    assert demo.converged_at(run, 1.0) is run[3]
    assert demo.converged_at([record(0.2, 0, 0.0), record(0.1, 50, 5.0)], 0.9) is None

    effort = {"corrective_episodes": 7, "takeover_steps": 90}
    row = demo.method_row([record(0.0, 0, 0.0), record(0.6, 400, 40.0, **effort)], 0.9)
    assert row["success"] == 0.6 and row["interventions"] == 7 and row["takeover_steps"] == 90
    assert row["env_steps_to_converge"] == 400 and row["wall_s_to_converge"] == 40.0
    assert demo.method_row([record(0.1, 0, 0.0)], 0.9)["env_steps_to_converge"] is None


def test_table_cells_are_mean_and_std_over_seeds():
    assert demo.fmt([0.5, 0.7], "percent") == "60.0 ± 10.0"
    assert demo.fmt([1200, None], "count") == "1,200 (1 of 2 seeds)"
    assert demo.fmt([1200, None, 1400], "count") == "1,300 ± 100 (2 of 3 seeds)"
    assert demo.fmt([None], "value") == "-"
    seeds = [demo.method_row([record(0.0, 0, 0.0), record(s, 100, 1.0)], 0.9) for s in (0.2, 0.4)]
    table = demo.table({"patch": seeds, "prior": seeds[:1]})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| policy patching | 30.0 ± 10.0 |")
    assert lines[3].startswith("| prior | 20.0 |")


def test_a_finished_stage_is_read_back_not_run_again(tmp_path):
    calls = []

    def work():
        calls.append(1)
        return {"value": 3}

    first = demo.Stages(tmp_path, total=1)("work", "a stage", work)
    again = demo.Stages(tmp_path, total=1)("work", "a stage", work)
    assert calls == [1] and again == first and first["value"] == 3 and "stage_wall_s" in first


@pytest.mark.slow
def test_the_prior_deployed_through_the_fleet_reaches_the_store_whole(tmp_path):
    write_tiny_prior(tmp_path / "prior")
    base = configs.get_config("demo")
    config = dataclasses.replace(
        base,
        pretrain=dataclasses.replace(base.pretrain, data_dir=str(tmp_path / "data")),
        demo=configs.DemoConfig(robots=2, episodes_per_robot=3),
    )
    config = demo.with_outputs(config, tmp_path)
    result = demo.deploy(config, pretrain.load(tmp_path / "prior"), tmp_path)

    assert result["stored"] == result["expected"] == 6
    without, with_operator = result["robots"]["robot-0"], result["robots"]["robot-1"]
    assert without["episodes"] == with_operator["episodes"] == 3
    # An untrained policy needs help, so the operator robot takes over.
    assert without["with_takeover"] == 0 and with_operator["with_takeover"] > 0
    logged = rlds.read_episodes(tmp_path / "data" / "pro" / "pick_place_fleet")
    assert sorted(ep["episode_metadata"]["robot_id"] for ep in logged) == ["robot-0"] * 3 + ["robot-1"] * 3
    json.dumps(result)  # a stage's result is kept as JSON
