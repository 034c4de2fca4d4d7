"""A third-party gymnasium robot on the fleet, as a new user meets it: `jaxvla serve --fleet.no-learner` on
loopback, `jaxvla publish`, `jaxvla.actor.loop.run` and examples/gym_robot.py, with every failure loud and
early.

The robot is `reach_env.ReachEnv` (gym-hil's layout: nested Dict observations, Box(7) actions, success in
info["succeed"]); the service is the real one, in a subprocess (tests/test_fleet_service.py's `Server`).
"""

import json
import logging
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import FakeTime
from reach_env import ENV_ID
from reach_env import ReachEnv
from test_fleet_service import TOKENS
from test_fleet_service import Server
from test_fleet_service import policy_file

from envs import scene
from envs import tasks
from jaxvla import cli
from jaxvla import schema
from jaxvla.actor import client as fleet
from jaxvla.actor import loop
from jaxvla.actor import policy as actor_policy
from jaxvla.actor import robots
from jaxvla.actor import runner
from learner.fleet import gate as gates
from learner.fleet.store import EpisodeStore
from learner.fleet.store import ParamsRegistry
from tools import publish as publish_tool

SCENE = np.array([0.45, 0.0, 1.0, 0, 0, 0, 0, 0, 0, 1.0], np.float32)  # pick_place's one bin, no lid


def reach_observation(obs) -> dict:
    """ReachEnv's observation on the schema's fields (docs/robot.md), as a user maps a new robot."""
    return {
        "proprio": np.concatenate([obs["agent"]["pos"], obs["agent"]["vel"], [0.0]]),
        "telemetry": np.zeros(3, np.float32),
        "item": np.concatenate([obs["cube"], np.full(3, 0.02, np.float32)]),
        "scene": SCENE,
    }


def reach_action(action: np.ndarray) -> np.ndarray:
    """The policy's [dx, dy, dz, suction] as the arm's [xyz, no rotation, gripper]."""
    return np.concatenate([action[:3], np.zeros(3, np.float32), action[3:]])


def reach_robot(robot_id: str = "robot-0", env=None, robot=robots.GymRobot) -> robots.GymRobot:
    """A GymRobot over ReachEnv (or `env`) with the mappings above: what a user connecting it writes."""
    return robot(
        env or ReachEnv(),
        robot_id=robot_id,
        task="pick_place",
        prompt="pick",
        observation_fn=reach_observation,
        action_fn=reach_action,
        success="succeed",
    )


def stored(server: Server) -> list[dict]:
    return [episode for _, episode in EpisodeStore(server.root / "store", writer=False).read_since(-1)]


def write_policy(path, version: int):
    path.write_bytes(policy_file(version, None))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A service without a learner, version 1 published with `jaxvla publish`."""
    srv = Server(tmp_path_factory.mktemp("fleet"))
    srv.start()
    file = write_policy(tmp_path_factory.mktemp("export") / "policy-v1.msgpack", 1)
    assert cli.main(["publish", str(file), "--root", str(srv.root)]) == 0
    yield srv
    srv.stop()


def fleet_client(server: Server, robot: str = "robot-0") -> fleet.FleetClient:
    return fleet.FleetClient(server.url, TOKENS[robot], timeout=10)


# ----------------------------------------------------------------------------- 1: publish, no learner
def test_without_a_learner_the_robot_shows_why_and_jaxvla_publish_fills_the_registry(tmp_path, capsys):
    srv = Server(tmp_path / "fleet")
    srv.start()
    try:
        with pytest.raises(SystemExit, match="no params published yet.*jaxvla publish FILE"):
            loop.run(reach_robot(), fleet_client(srv), tmp_path / "robot", episodes=1, hz=0, wait_s=5)

        root = ["--root", str(srv.root)]
        assert cli.main(["publish", str(write_policy(tmp_path / "v3.msgpack", 3)), *root]) == 0
        assert cli.main(["publish", str(write_policy(tmp_path / "v2.msgpack", 2)), *root]) == 1
        assert "version 2, not above the published 3" in capsys.readouterr().err
        corrupt = tmp_path / "corrupt.msgpack"
        corrupt.write_bytes(policy_file(4, 3)[:-10])
        assert cli.main(["publish", str(corrupt), *root]) == 1
        assert "not a policy a robot can run" in capsys.readouterr().err

        # The gate is optional; given, it scores the file against the published one (here: by version).
        registry = ParamsRegistry(srv.root / "params")
        newer_is_worse = gates.Gate(lambda data: -actor_policy.loads(data).version, margin=0.5)
        with pytest.raises(publish_tool.NotPublished, match="the gate refused version 4"):
            publish_tool.publish(registry, policy_file(4, 3), newer_is_worse)
        entry = publish_tool.publish(registry, policy_file(4, 3), gates.Gate(lambda data: 1.0, margin=0.0))
        assert entry["gate"] == {
            "candidate": 1.0,
            "current": 1.0,
            "margin": 0.0,
            "passed": True,
            "manual": True,
        }

        result = loop.run(reach_robot(), fleet_client(srv), tmp_path / "robot", episodes=2, hz=0)
        assert [r["policy_version"] for r in result.records] == [4, 4]
        episodes = stored(srv)
        assert len(episodes) == 2 and {e["episode_metadata"]["policy_version"] for e in episodes} == {"4"}
    finally:
        srv.stop()


# ------------------------------------------------------------------------------------ the wait_s bug
def test_a_restarted_robot_with_cached_params_starts_without_waiting_for_a_download(server, tmp_path):
    # The cache holds the published version, so nothing newer is ever downloaded (`swapped` stays unset).
    (tmp_path / "robot").mkdir()
    (tmp_path / "robot" / "params.msgpack").write_bytes(ParamsRegistry(server.root / "params").read(1))
    done = {}
    thread = threading.Thread(
        target=lambda: done.update(
            result=loop.run(
                reach_robot(), fleet_client(server), tmp_path / "robot", episodes=1, hz=0, wait_s=3_600
            )
        ),
        daemon=True,
    )
    thread.start()
    thread.join(timeout=120)  # a wait for `swapped` would last wait_s = an hour: far past this bound
    assert not thread.is_alive(), "the robot waited for a download although it had cached params"
    assert [r["policy_version"] for r in done["result"].records] == [1]


# ------------------------------------------------------------------------------ 4: loud failures
def test_a_token_of_another_robot_or_an_unknown_one_stops_the_robot_before_it_moves(server, tmp_path):
    robot = reach_robot(robot_id="gym-0")
    with pytest.raises(
        SystemExit, match="the token belongs to robot 'robot-0', but this robot's id is 'gym-0'"
    ):
        loop.run(robot, fleet_client(server), tmp_path, episodes=1, hz=0)
    unknown = fleet.FleetClient(server.url, "not-a-token-of-this-fleet", timeout=10)
    with pytest.raises(SystemExit, match="refuses this robot's token.*401"):
        loop.run(reach_robot(), unknown, tmp_path, episodes=1, hz=0)
    assert robot.env.resets == 0, "the env was reset: the robot started before the check"


def test_an_episode_the_service_refuses_is_logged_counted_and_fails_the_exit_status(server, tmp_path, caplog):
    # What the robot cannot check itself: the service's own limits (this one takes 300 steps at most).
    robot = reach_robot(env=ReachEnv(steps=301))
    before = len(stored(server))
    with caplog.at_level(logging.ERROR, logger="jaxvla.actor"):
        result = loop.run(robot, fleet_client(server), tmp_path, episodes=1, hz=0)
    assert result.records[0]["steps"] == 301
    assert result.uploads["rejected"] == 1 and "301 steps, over the limit of 300" in result.last_rejection
    assert any("refused" in r.message and "over the limit" in r.message for r in caplog.records)
    assert "1 rejected" in loop.summary(result) and loop.exit_status(result) == 1
    assert len(stored(server)) == before
    assert len(list((tmp_path / "spool" / "rejected").glob("*.reason"))) == 1


# ------------------------------------------------------------------------- 9: lateness per episode
def test_lateness_and_overruns_are_recorded_per_episode(server, tmp_path, monkeypatch):
    t = FakeTime()
    fake_clock = lambda hz: runner.RateClock(hz, clock=t.clock, sleep=t.sleep)  # noqa: E731
    monkeypatch.setattr(loop, "RateClock", fake_clock)
    step_cost = iter([0.25] * 5 + [0.0] * 5)  # the first episode's 5 steps overrun a 10 Hz period

    class Timed(robots.GymRobot):
        def act(self, action):
            t.now += next(step_cost)
            return super().act(action)

    robot = reach_robot(env=ReachEnv(steps=5), robot=Timed)
    first, second = loop.run(robot, fleet_client(server), tmp_path, episodes=2, hz=10).records
    assert first["steps"] == second["steps"] == 5
    assert first["overruns"] == 4 and first["p99_ms"] > 0
    assert second["overruns"] == 0 and second["p99_ms"] < 1e-9  # 0 up to the fake clock's rounding


# ----------------------------------------------------------------- the example, with no learner extras
BLOCKED_LEARNER = """
import importlib.abc, importlib.util, sys
BLOCKED = ("jax", "jaxlib", "flax", "mujoco", "tensorflow_datasets", "tensorflow", "aiohttp", "envs",
           "learner", "configs", "tools")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"the robot example imported {name}")
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("gym_robot", "examples/gym_robot.py")
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
if "--bad-key" in sys.argv:  # a user's mapping with a field the schema does not have
    sys.argv.remove("--bad-key")
    example.packed = lambda obs: {"state": example.flat(obs)}
sys.exit(example.main(sys.argv[1:]))
"""


def run_example(server: Server, folder, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    command = [
        sys.executable,
        "-c",
        BLOCKED_LEARNER,
        "--env",
        f"reach_env:{ENV_ID}",
        "--url",
        server.url,
        "--token-file",
        str(server.root / "tokens.json"),
        "--folder",
        str(folder),
        "--hz",
        "0",
        *args,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_the_example_runs_a_gymnasium_env_on_the_fleet_with_no_learner_extras(server, tmp_path):
    before = len(stored(server))
    out = run_example(
        server, tmp_path / "ok", "--robot-id", "robot-1", "--episodes", "3", "--success-key", "succeed"
    )
    assert out.returncode == 0, out.stderr
    assert "3 stored, 0 duplicates, 0 rejected" in out.stdout
    episodes = stored(server)[before:]
    assert [e["episode_metadata"]["robot_id"] for e in episodes] == ["robot-1"] * 3
    assert all(e["steps"]["observation"]["proprio"].shape[1:] == (7,) for e in episodes)

    # A mapping with a field the schema lacks stops the robot before its first step, naming the fields.
    bad_key = run_example(server, tmp_path / "key", "--robot-id", "robot-1", "--bad-key")
    assert bad_key.returncode != 0
    assert (
        "missing fields ['item', 'proprio', 'scene', 'telemetry'], unexpected fields ['state']"
        in bad_key.stderr
    )
    assert len(stored(server)) == before + 3
    assert not list((tmp_path / "key" / "spool").glob("*.msgpack"))


def test_the_example_refuses_a_robot_id_that_is_not_its_tokens(server, tmp_path):
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"gym-0": TOKENS["robot-0"]}))  # the id a GymRobot used to default to
    out = run_example(server, tmp_path / "robot", "--robot-id", "gym-0", "--token-file", str(tokens))
    assert out.returncode != 0
    assert "the token belongs to robot 'robot-0', but this robot's id is 'gym-0'" in out.stderr


# --------------------------------------------------------------------- 7: the contract, in one place
def test_docs_robot_md_states_every_field_and_the_simulators_numbers():
    doc = (REPO_ROOT / "docs" / "robot.md").read_text()
    for name, spec in schema.OBSERVATION_SPEC.items():
        assert f"| `{name}` {schema.describe(spec)} |" in doc, f"docs/robot.md lacks the row of {name!r}"
    config = tasks.CellConfig()
    (x_lo, y_lo, _), (x_hi, y_hi, z_hi) = scene.WORKSPACE_LO, scene.WORKSPACE_HI
    facts = [
        f"v_max = {config.v_max} m/s",
        f"control_hz = {config.control_hz:g}",
        f"{config.p_max_kpa:g} kPa",
        f"{config.cup_radius} m below",
        f"{config.collision_force:g} N",
        f"{config.obs_noise * 1e3:g} mm noise",
        f"x in [{x_lo}, {x_hi}] m",
        f"y in [{y_lo}, {y_hi}] m",
        f"z in [{config.cup_radius}, {z_hi}] m",
        f"{config.max_steps} steps",
        ", ".join(schema.FAILURE_MODES),
        ", ".join(schema.EVENTS),
    ]
    for spec in tasks.TASKS.values():
        facts += [f"| `{spec.name}` |", *(f"({cx}, {cy})" for cx, cy, _, _ in spec.bins)]
        facts += [f"{scene.lid_travel(spec):g} m towards -x"] if spec.has_lid else []
    missing = [fact for fact in facts if fact not in doc]
    assert not missing, f"docs/robot.md disagrees with envs/ on {missing}"
