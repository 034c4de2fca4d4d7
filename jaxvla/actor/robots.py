"""What the actor drives: `RobotInterface`, and adapters for gymnasium environments and real arms.

The actor loop (`jaxvla.actor.runner`) calls, once per control period: `observe()` for the sensors,
the policy, `intervention(obs, policy_action)` for the teleop device (None: no takeover this step), and
`act(action)` to send the command, which returns the step's `Feedback`. An episode starts with
`reset(seed)` and ends when feedback says terminal or truncated; `outcome()` then gives the verdict.

Observations are dicts of arrays in the workcell's schema (`jaxvla.episodes.OBSERVATION_SPEC`: proprio,
telemetry, item, scene, prompt), since that is what the policy reads and the service stores. Actions are
in [-1, 1] per dimension; an adapter scales them to its hardware. The C-MuJoCo twin's adapter is
`envs.twin_robot.TwinRobot` (it needs mujoco, so it lives outside this numpy-only package).
Standard library and numpy only.
"""

import abc
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

N_EVENTS = 7  # jaxvla.episodes.N_EVENTS, not imported: that module needs tensorflow-datasets


class Feedback(NamedTuple):
    """What one control step did: its reward and whether the episode ended, and why."""

    reward: float
    terminal: bool  # ended in a terminal state (success, drop, wrong bin, collision)
    truncated: bool  # ended by a time limit
    failure_mode: int = 0  # index into envs.cell.FAILURE_MODES (0: none)
    events: np.ndarray = np.zeros(N_EVENTS, bool)  # grasp, release, slip, drop, retry, collision, missed


class RobotInterface(abc.ABC):
    """A robot (or simulator) the actor runs episodes on."""

    robot_id: str = "robot-0"
    task: str = "pick_place"
    control_hz: float = 10.0

    @abc.abstractmethod
    def reset(self, seed: int | None = None) -> dict:
        """Brings the cell to the start of an episode; returns the first observation."""

    @abc.abstractmethod
    def observe(self) -> dict:
        """The current observation (read the sensors now)."""

    @abc.abstractmethod
    def act(self, action: np.ndarray) -> Feedback:
        """Sends one command ([A] in [-1, 1]) and returns what it did."""

    def intervention(self, obs: dict, policy_action: np.ndarray) -> np.ndarray | None:
        """The teleop device: an action that replaces the policy's this step, or None. Default: none."""
        return None

    @abc.abstractmethod
    def outcome(self) -> dict:
        """The finished episode's verdict: success (bool), retries (int), cycle_time (s), prompt (str)."""


# ------------------------------------------------------------------------------------------ gymnasium
def _is_box(space) -> bool:
    return all(hasattr(space, a) for a in ("low", "high", "shape")) and not hasattr(space, "spaces")


def _is_dict(space) -> bool:
    return isinstance(getattr(space, "spaces", None), dict) and all(_is_box(s) for s in space.spaces.values())


class GymRobot(RobotInterface):
    """Any environment with the gymnasium API: `reset(seed=) -> (obs, info)`, `step(a) -> (obs, reward,
    terminated, truncated, info)`, a Box or Dict-of-Box `observation_space` and a Box `action_space`.

    Duck-typed (gymnasium itself is not a dependency). `observation_fn` maps the env's observation to the
    policy's observation dict (default: a Dict observation as is, a Box one as {"state": obs}). Actions
    in [-1, 1] are scaled to the Box's bounds. `teleop(obs, policy_action)` is the intervention source.
    Success is `info["is_success"]` when the env reports it, else "terminated with positive reward".
    """

    def __init__(self, env, *, task: str, prompt: str, robot_id: str = "gym-0", control_hz: float = 10.0,
                 observation_fn: Callable[[object], dict] | None = None,
                 teleop: Callable[[dict, np.ndarray], np.ndarray | None] | None = None):  # fmt: skip
        if not (_is_box(env.observation_space) or _is_dict(env.observation_space)):
            raise TypeError(
                f"observation_space must be a Box or a Dict of Boxes, got {env.observation_space}"
            )
        if not _is_box(env.action_space):
            raise TypeError(f"action_space must be a Box, got {env.action_space}")
        self.env, self.task, self.prompt, self.robot_id = env, task, prompt, robot_id
        self.control_hz = control_hz
        self._map = observation_fn or (lambda o: dict(o) if isinstance(o, dict) else {"state": o})
        self._teleop = teleop
        low, high = (np.asarray(b, np.float32) for b in (env.action_space.low, env.action_space.high))
        self._centre, self._half = (high + low) / 2, (high - low) / 2
        self._obs, self._info, self._steps, self._last = None, {}, 0, Feedback(0.0, False, False)

    def reset(self, seed: int | None = None) -> dict:
        self._obs, self._info = self.env.reset(seed=seed)
        self._steps, self._last = 0, Feedback(0.0, False, False)
        return self.observe()

    def observe(self) -> dict:
        return self._map(self._obs)

    def act(self, action: np.ndarray) -> Feedback:
        command = self._centre + self._half * np.clip(np.asarray(action, np.float32), -1.0, 1.0)
        self._obs, reward, terminated, truncated, self._info = self.env.step(command)
        self._steps += 1
        self._last = Feedback(float(reward), bool(terminated), bool(truncated))
        return self._last

    def intervention(self, obs: dict, policy_action: np.ndarray) -> np.ndarray | None:
        return None if self._teleop is None else self._teleop(obs, policy_action)

    def outcome(self) -> dict:
        success = self._info.get("is_success", self._last.terminal and self._last.reward > 0)
        return {"success": bool(success), "retries": 0, "cycle_time": self._steps / self.control_hz,
                "prompt": self.prompt}  # fmt: skip


# ------------------------------------------------------------------------------------------- real arm
class ArmTemplate(RobotInterface):
    """A template for a real suction arm: subclass it and fill in the four methods with your driver.

    The actor calls them from one thread at `control_hz`; each must return within the control period
    (a few ms), so read sensors from a driver thread that keeps the latest values, and send commands
    without waiting for the motion to finish. A timeout or a driver fault should raise: the actor ends
    the episode, spools what was recorded, and the operator sees the error.

    - `reset`: home the arm, check the vacuum, wait for the operator to present an item (or the
      conveyor), then return `observe()`.
    - `observe`: the observation dict in the workcell's schema: proprio [7] (cup position m, velocity
      m/s, suction command), telemetry [3] (vacuum / p_max, wrist force / 50 N, slip ratio), item [6]
      (estimated position m, half size m, from the vision system), scene [10] (bins, lid), prompt [12]
      (`jaxvla.tokenizer.encode` of the goal text). Units must match the simulator's: the policy's
      normalisation statistics were computed there.
    - `act`: scale [dx, dy, dz] in [-1, 1] by the arm's v_max into a Cartesian velocity command, and open
      or close the valve on the sign of the last entry; return `Feedback` with terminal set when the
      item lands in the target bin or is dropped, truncated at the episode's time limit.
    - `intervention`: poll the teleop device (spacemouse, pendant): while its deadman switch is held,
      return its command mapped to [-1, 1]; otherwise None. Interventions are flagged in the episode.
    - `outcome`: success as judged by the cell's sensors or the operator (the operator can also label
      it later with `POST /v1/episodes/<id>/label`).
    """

    def __init__(self, robot_id: str, task: str = "pick_place", control_hz: float = 10.0):
        self.robot_id, self.task, self.control_hz = robot_id, task, control_hz

    def reset(self, seed: int | None = None) -> dict:
        raise NotImplementedError("ArmTemplate.reset: home the arm and present an item (see the class doc)")

    def observe(self) -> dict:
        raise NotImplementedError("ArmTemplate.observe: read the latest sensor values (see the class doc)")

    def act(self, action: np.ndarray) -> Feedback:
        raise NotImplementedError("ArmTemplate.act: send the velocity and valve command (see the class doc)")

    def outcome(self) -> dict:
        raise NotImplementedError("ArmTemplate.outcome: report the episode's verdict (see the class doc)")
