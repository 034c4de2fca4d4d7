"""The robot side of the fleet without jax: the import boundary, the fixed-rate clock, the gymnasium and
twin adapters, recorded episodes that the service's schema accepts, and the wire codec."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from jaxvla import episodes as E
from jaxvla.actor import client as fleet
from jaxvla.actor import robots
from jaxvla.actor import runner
from jaxvla.actor import wire

BLOCKED_IMPORTS = """
import importlib.abc, json, sys
BLOCKED = ("jax", "jaxlib", "flax", "mujoco", "tensorflow_datasets", "tensorflow", "aiohttp", "envs",
           "learner")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"the robot client imported {name}")
sys.meta_path.insert(0, Block())
before = set(sys.modules)
import jaxvla.actor, jaxvla.actor.client, jaxvla.actor.robots, jaxvla.actor.runner, jaxvla.actor.wire
loaded = {m.partition(".")[0] for m in set(sys.modules) - before}
print(json.dumps(sorted(loaded - set(sys.stdlib_module_names))))
"""


def test_client_modules_import_nothing_but_numpy_msgpack_and_the_standard_library():
    out = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORTS], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    loaded = {m for m in json.loads(out.stdout) if m != "cython_runtime" and not m.startswith("_cython_")}
    assert loaded <= {"jaxvla", "numpy", "msgpack"}


class FakeTime:
    """A clock that advances only when slept on, plus a step cost per tick to simulate slow steps."""

    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_rate_clock_keeps_the_schedule_and_skips_after_an_overrun():
    t = FakeTime()
    clock = runner.RateClock(10.0, clock=t.clock, sleep=t.sleep)
    starts = []
    for work in (0.02, 0.02, 0.25, 0.02, 0.02):  # the third step takes 2.5 periods
        clock.tick()
        starts.append(round(t.now, 6))
        t.now += work
    # Ticks at 0, 0.1, 0.2; the step from 0.2 ends at 0.45: the slots at 0.3 and 0.4 are gone, so the
    # next tick is 0.45 (late against 0.4: no burst of commands), then back on the 0.1 grid at 0.5.
    assert starts == [0.0, 0.1, 0.2, 0.45, 0.5]
    assert clock.overruns == 1
    np.testing.assert_allclose(list(clock.lateness), [0, 0, 0, 0.05, 0], atol=1e-9)


class Box:
    def __init__(self, low, high, shape):
        self.low, self.high, self.shape = (
            np.full(shape, low, np.float32),
            np.full(shape, high, np.float32),
            shape,
        )


class Dict:
    def __init__(self, spaces):
        self.spaces = spaces


class FakeGymEnv:
    """The gymnasium API with a Dict observation in the workcell's schema; success after 3 steps."""

    observation_space = Dict({k: Box(-1, 1, s.shape) for k, s in E.OBSERVATION_SPEC.items() if k != "prompt"})
    action_space = Box(-2.0, 2.0, (4,))

    def reset(self, seed=None):
        self.t, self.rng, self.commands = 0, np.random.default_rng(seed), []
        return self._obs(), {}

    def step(self, action):
        self.commands.append(np.asarray(action))
        self.t += 1
        done = self.t == 3
        return self._obs(), float(done), done, False, {"is_success": done}

    def _obs(self):
        return {k: self.rng.standard_normal(s.shape) for k, s in E.OBSERVATION_SPEC.items() if k != "prompt"}


class FakePolicy:
    """The Policy interface the broker needs: a chunk of constant actions, a version."""

    chunk, action_size, version = 2, 4, 7

    def reset(self):
        pass

    def infer(self, obs):
        return {"actions": np.full((2, 4), 0.5, np.float32)}


def with_prompt(obs):
    return {**obs, "prompt": np.zeros(12, np.int32)}


def test_gym_adapter_scales_actions_flags_teleop_and_records_a_valid_episode():
    env = FakeGymEnv()
    teleop = lambda obs, action: np.array([-1, 0, 0, 1], np.float32) if obs["proprio"][0] > 9 else None  # noqa: E731
    robot = robots.GymRobot(env, task="pick_place", prompt="pick", observation_fn=with_prompt, teleop=teleop)
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
    np.testing.assert_allclose(env.commands[0], [1.0, 1.0, 1.0, 1.0])  # 0.5 of the half-range 2 around 0
    assert E.check_episode(episode) == 3
    meta = episode["episode_metadata"]
    assert meta["success"] and meta["policy_version"] == "7" and meta["source"] == "online"
    assert episode["steps"]["is_terminal"].tolist() == [False, False, True]

    always = lambda obs, action: np.zeros(4, np.float32)  # noqa: E731
    robot = robots.GymRobot(env, task="pick_place", prompt="pick", observation_fn=with_prompt, teleop=always)
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=1)
    assert episode["steps"]["is_intervention"].all() and episode["episode_metadata"]["source"] == "patch"
    np.testing.assert_array_equal(episode["steps"]["policy_action"][0], [0.5] * 4)


def test_gym_adapter_refuses_spaces_it_cannot_drive():
    class Discrete:
        n = 3

    env = FakeGymEnv()
    env.action_space = Discrete()
    with pytest.raises(TypeError, match="action_space must be a Box"):
        robots.GymRobot(env, task="t", prompt="p")


def test_the_real_arm_template_says_what_to_implement():
    with pytest.raises(NotImplementedError, match="home the arm"):
        robots.ArmTemplate("arm-0").reset()


def test_twin_robot_with_the_operator_records_interventions_the_service_accepts():
    from envs.operator import Trigger
    from envs.twin_robot import TwinRobot

    class Still(FakePolicy):
        def infer(self, obs):  # a policy that never moves: the stall trigger hands over to the operator
            return {"actions": np.zeros((2, 4), np.float32)}

    robot = TwinRobot(
        "pick_place", "train", robot_id="twin-7", trigger=Trigger(stall_steps=5, hand_back=False)
    )
    episode = runner.run_episode(robot, Still(), clock=runner.RateClock(0), seed=3)
    E.check_episode(episode)
    steps, meta = episode["steps"], episode["episode_metadata"]
    assert steps["is_intervention"][5:].any() and not steps["is_intervention"][:5].any()
    taken = steps["is_intervention"]
    assert not np.allclose(steps["action"][taken], steps["policy_action"][taken])
    assert meta["source"] == "patch" and meta["robot_id"] == "twin-7" and meta["prompt"].startswith("pick")
    assert meta["success"], "the scripted operator, keeping control, completes a train-split pick"


def test_wire_round_trip_and_openpi_encoding():
    obs = {"state": np.arange(6, dtype=np.float32).reshape(2, 3), "flag": np.bool_(True), "prompt": "pick"}
    back = wire.unpackb(wire.packb(obs))
    np.testing.assert_array_equal(back["state"], obs["state"])
    assert back["state"].dtype == np.float32 and back["flag"] == np.bool_(True) and back["prompt"] == "pick"
    import msgpack  # openpi's encoding: bytes keys

    openpi = msgpack.packb({b"__ndarray__": True, b"data": b"\x00" * 8, b"dtype": "<f4", b"shape": (2,)})
    np.testing.assert_array_equal(wire.unpackb(openpi), [0.0, 0.0])
    with pytest.raises(TypeError):
        wire.packb({"x": np.array(["a"], object)})


def test_backoff_doubles_up_to_its_cap_and_resets():
    backoff = fleet.Backoff(base=1.0, cap=8.0, seed=0)
    delays = [backoff.next_delay() for _ in range(6)]
    for delay, bound in zip(delays, [1, 2, 4, 8, 8, 8], strict=True):
        assert bound / 2 <= delay <= bound
    backoff.reset()
    assert backoff.next_delay() <= 1.0


def test_a_full_spool_refuses_rather_than_dropping(tmp_path):
    spool = fleet.Spool(tmp_path, max_episodes=2)
    spool.put("a", b"1")
    spool.put("b", b"2")
    with pytest.raises(fleet.SpoolFull):
        spool.put("c", b"3")
    assert [p.read_bytes() for p in spool.files()] == [b"1", b"2"]
