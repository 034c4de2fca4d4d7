"""The robot side of the fleet without jax: the import boundary, the fixed-rate clock, the gymnasium and
twin adapters, recorded episodes that the service's schema accepts, and the wire codec."""

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT
from conftest import FakeTime

from jaxvla import episodes as E
from jaxvla import tokenizer
from jaxvla.actor import client as fleet
from jaxvla.actor import robots
from jaxvla.actor import runner
from jaxvla.actor import wire

BLOCKED_IMPORTS = """
import importlib.abc, json, sys
BLOCKED = ("jax", "jaxlib", "flax", "mujoco", "tensorflow_datasets", "tensorflow", "aiohttp", "envs",
           "learner", "configs", "tools")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in BLOCKED:
            raise ImportError(f"the robot client imported {name}")
sys.meta_path.insert(0, Block())
before = set(sys.modules)
import importlib, pkgutil, jaxvla.actor
for module in pkgutil.iter_modules(jaxvla.actor.__path__):  # every module a robot may import
    importlib.import_module(f"jaxvla.actor.{module.name}")
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


def gym_robot(env, **kwargs) -> robots.GymRobot:
    return robots.GymRobot(env, robot_id="robot-0", task="pick_place", prompt="pick", **kwargs)


def test_gym_adapter_scales_actions_flags_teleop_and_records_a_valid_episode():
    env = FakeGymEnv()
    teleop = lambda obs, action: np.array([-1, 0, 0, 1], np.float32) if obs["proprio"][0] > 9 else None  # noqa: E731
    robot = gym_robot(env, success="is_success", teleop=teleop)
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
    np.testing.assert_allclose(env.commands[0], [1.0, 1.0, 1.0, 1.0])  # 0.5 of the half-range 2 around 0
    assert E.check_episode(episode) == 3
    meta = episode["episode_metadata"]
    assert meta["success"] and meta["policy_version"] == "7" and meta["source"] == "online"
    assert episode["steps"]["is_terminal"].tolist() == [False, False, True]

    always = lambda obs, action: np.zeros(4, np.float32)  # noqa: E731
    robot = gym_robot(env, success="is_success", teleop=always)
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=1)
    assert episode["steps"]["is_intervention"].all() and episode["episode_metadata"]["source"] == "patch"
    np.testing.assert_array_equal(episode["steps"]["policy_action"][0], [0.5] * 4)


def test_gym_adapter_refuses_spaces_it_cannot_drive():
    class Discrete:
        n = 3

    env = FakeGymEnv()
    env.action_space = Discrete()
    with pytest.raises(TypeError, match="not a Box; pass action_fn"):
        gym_robot(env, success="is_success")
    env = FakeGymEnv()
    env.observation_space = Box(-1, 1, (26,))
    with pytest.raises(TypeError, match="pass observation_fn"):
        gym_robot(env, success="is_success")


class ArmEnv(FakeGymEnv):
    """A 7-joint arm: Box(7) actions, and a Box(26) observation that is not the schema's."""

    observation_space = Box(-1, 1, (26,))
    action_space = Box(-1.0, 1.0, (7,))

    def _obs(self):
        return self.rng.standard_normal(26)


def split_fields(obs) -> dict:
    """ArmEnv's 26 values as the schema's four float fields."""
    parts = np.split(np.asarray(obs, np.float32), [7, 10, 16])
    return dict(zip(("proprio", "telemetry", "item", "scene"), parts, strict=True))


def test_action_size_is_checked_at_construction_and_action_fn_maps_it():
    env = ArmEnv()
    with pytest.raises(ValueError, match=r"action_space has shape \(7,\) but the policy's actions have 4"):
        gym_robot(env, observation_fn=split_fields, success="is_success")
    with pytest.raises(ValueError, match=r"into shape \(5,\), but the env's action_space has shape \(7,\)"):
        gym_robot(env, observation_fn=split_fields, success="is_success", action_fn=lambda a: np.zeros(5))

    to_arm = lambda a: np.concatenate([a[:3], np.zeros(3), a[3:]])  # noqa: E731  (xyz, no rotation, gripper)
    robot = gym_robot(env, observation_fn=split_fields, success="is_success", action_fn=to_arm)
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
    np.testing.assert_allclose(env.commands[0], [0.5, 0.5, 0.5, 0, 0, 0, 0.5])
    assert E.check_episode(episode) == 3


def test_the_prompt_is_tokenised_by_the_robot_and_a_bad_observation_stops_it_before_the_first_step():
    env = ArmEnv()
    to_arm = lambda a: np.zeros(7)  # noqa: E731
    texted = lambda obs: {**split_fields(obs), "prompt": "pick the part from the tote"}  # noqa: E731
    robot = gym_robot(env, observation_fn=texted, success="is_success", action_fn=to_arm)
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
    np.testing.assert_array_equal(episode["steps"]["observation"]["prompt"][0], tokenizer.encode("pick"))

    cases = [
        (
            lambda obs: {"state": np.asarray(obs)},
            r"missing fields \['item', 'proprio', 'scene', 'telemetry'\]",
        ),
        (lambda obs: {**split_fields(obs), "item": np.zeros(5)}, r"'item' has shape \[5\].*float32\[6\]"),
        (lambda obs: {**split_fields(obs), "scene": np.array(["bin"] * 10)}, "'scene' is a <U3 array"),
        (lambda obs: {**split_fields(obs), "telemetry": np.full(3, np.nan)}, "'telemetry' has non-finite"),
    ]
    for observation_fn, message in cases:
        env = ArmEnv()
        robot = gym_robot(env, observation_fn=observation_fn, success="is_success", action_fn=to_arm)
        with pytest.raises(ValueError, match=message):
            runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
        assert env.commands == [], "the robot must not move before its observation is known to be valid"


def test_a_sensor_that_turns_nan_stops_the_robot_before_the_policy_acts_on_it():
    readings = []

    def glitching(obs) -> dict:  # NaN from the third reading on
        readings.append(obs)
        return {**split_fields(obs), "telemetry": np.full(3, np.nan if len(readings) > 2 else 0.0)}

    env = ArmEnv()
    robot = gym_robot(env, observation_fn=glitching, success="is_success", action_fn=lambda a: np.zeros(7))
    with pytest.raises(ValueError, match="step 2: observation 'telemetry' has non-finite values"):
        runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
    assert len(env.commands) == 2


class NestedEnv(FakeGymEnv):
    """gym-hil's image_obs layout: a Dict holding a Dict of state and a Dict of images."""

    observation_space = Dict(
        {"agent": Dict({"pos": Box(-1, 1, (7,))}), "pixels": Dict({"front": Box(0, 1, (4, 4, 3))})}
    )

    def _obs(self):
        return {"agent": {"pos": self.rng.standard_normal(7)}, "pixels": {"front": np.zeros((4, 4, 3))}}


def test_nested_dict_observations_run_through_observation_fn():
    def from_nested(obs) -> dict:
        zeros = {k: np.zeros(s.shape, np.float32) for k, s in E.OBSERVATION_SPEC.items() if k != "prompt"}
        return {**zeros, "proprio": obs["agent"]["pos"]}

    with pytest.raises(TypeError, match="pass observation_fn"):
        gym_robot(NestedEnv(), success="is_success")
    robot = gym_robot(NestedEnv(), observation_fn=from_nested, success="is_success")
    episode = runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0), seed=0)
    assert E.check_episode(episode) == 3


class OutOfBoundsEnv(FakeGymEnv):
    """A dense reward, and a termination that is a failure: the cube left the workspace."""

    def step(self, action):
        obs, _, _, _, _ = super().step(action)
        return obs, 0.3, True, False, {"succeed": False}


def success_of(robot) -> bool:
    return runner.run_episode(robot, FakePolicy(), clock=runner.RateClock(0))["episode_metadata"]["success"]


def test_success_is_read_from_the_named_key_and_a_guess_warns():
    assert not success_of(gym_robot(OutOfBoundsEnv(), success="succeed"))
    assert not success_of(gym_robot(OutOfBoundsEnv(), success=lambda info: info["succeed"]))
    with pytest.warns(UserWarning, match="success is guessed"):
        robot = gym_robot(OutOfBoundsEnv())
    # the guess (terminated with a positive reward) counts this failure as a success: why it warns
    assert success_of(robot)
    with pytest.raises(KeyError, match=r"success key 'is_success' is not in the env's last info.*'succeed'"):
        success_of(gym_robot(OutOfBoundsEnv(), success="is_success"))


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
