"""What the actor drives: `RobotInterface`, and adapters for gymnasium environments and real arms.

The actor loop (`jaxvla.actor.runner`) calls, once per control period: `observe()` for the sensors,
the policy, `intervention(obs, policy_action)` for the teleop device (None: no takeover this step), and
`act(action)` to send the command, which returns the step's `Feedback`. An episode starts with
`reset(seed)` and ends when feedback says terminal or truncated; `outcome()` then gives the verdict.

Observations are dicts of arrays in the workcell's schema (`jaxvla.schema.OBSERVATION_SPEC`: proprio,
telemetry, item, scene, prompt; units and frames in docs/robot.md), since that is what the policy reads
and the service stores; the runner checks every observation against it. Actions are
[dx, dy, dz, suction] in [-1, 1]; an adapter scales them to its hardware. The C-MuJoCo twin's adapter is
`envs.twin_robot.TwinRobot` (it needs mujoco, so it lives outside this numpy-only package).
Standard library, numpy and the numpy-only `jaxvla.schema` and `jaxvla.tokenizer`.
"""

import abc
import warnings
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxvla import schema
from jaxvla import tokenizer


class Feedback(NamedTuple):
    """What one control step did: its reward and whether the episode ended, and why."""

    reward: float
    terminal: bool  # ended in a terminal state (success, drop, wrong bin, collision)
    truncated: bool  # ended by a time limit
    failure_mode: int = 0  # index into schema.FAILURE_MODES (0: none)
    events: np.ndarray = np.zeros(schema.N_EVENTS, bool)  # one flag per name in schema.EVENTS


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


def _identity_observation_error(space) -> str | None:
    """Why an env's observations cannot be used as they are (no `observation_fn`), or None if they can:
    only a Dict of Boxes with the schema's observation fields (the prompt is the robot's) can."""
    fields = {k: s for k, s in schema.OBSERVATION_SPEC.items() if k != "prompt"}
    if not _is_dict(space):
        return f"the observation_space is {space}, not a Dict of Boxes"
    got = {k: tuple(s.shape) for k, s in space.spaces.items()}
    wanted = {k: s.shape for k, s in fields.items()}
    if got != wanted:
        return f"the observation_space's fields are {got}, not the schema's {wanted}"
    return None


def _scale_to_box(space) -> Callable[[np.ndarray], np.ndarray]:
    """Maps actions in [-1, 1] linearly onto a Box's bounds."""
    low, high = (np.asarray(b, np.float32) for b in (space.low, space.high))
    centre, half = (high + low) / 2, (high - low) / 2
    return lambda action: centre + half * np.clip(np.asarray(action, np.float32), -1.0, 1.0)


def _default_action_fn(space) -> Callable[[np.ndarray], np.ndarray]:
    if not _is_box(space):
        raise TypeError(
            f"action_space is {space}, not a Box; pass action_fn mapping the policy's action "
            f"[{schema.ACTION_SIZE}] in [-1, 1] onto it"
        )
    if tuple(space.shape) != (schema.ACTION_SIZE,):
        raise ValueError(
            f"the env's action_space has shape {tuple(space.shape)} but the policy's actions have "
            f"{schema.ACTION_SIZE} entries ([dx, dy, dz, suction] in [-1, 1]); pass action_fn mapping them "
            f"onto the env's {tuple(space.shape)}"
        )
    return _scale_to_box(space)


def _check_command(action_fn: Callable[[np.ndarray], object], space) -> None:
    """Calls `action_fn` once on a zero action: its command must have the action space's shape."""
    command = action_fn(np.zeros(schema.ACTION_SIZE, np.float32))
    shape = getattr(space, "shape", None)
    if shape is not None and np.shape(command) != tuple(shape):
        raise ValueError(
            f"action_fn turns the policy's action [{schema.ACTION_SIZE}] into shape {np.shape(command)}, "
            f"but the env's action_space has shape {tuple(shape)}"
        )


def _guessed_success(info: dict, last: Feedback) -> bool:
    return bool(info.get("is_success", last.terminal and last.reward > 0))


class GymRobot(RobotInterface):
    """Any environment with the gymnasium API: `reset(seed=) -> (obs, info)`, `step(a) -> (obs, reward,
    terminated, truncated, info)`. Duck-typed: gymnasium itself is not a dependency.

    - `robot_id`: this robot's key in the fleet's tokens file (`jaxvla serve` writes robot-0, robot-1, ..).
    - `prompt`: the goal text; it is tokenised here and put into every observation as "prompt".
    - `observation_fn(env_obs) -> dict`: the env's observation (any space, nested Dicts too) mapped onto
      the schema's fields proprio, telemetry, item and scene, in the units of docs/robot.md. Without it
      the env's observation must already be a Dict of Boxes with exactly those fields.
    - `action_fn(action) -> env action`: the policy's action [4] in [-1, 1] ([dx, dy, dz, suction])
      mapped onto the env's action. Without it, the env's action space must be a Box of shape (4,), and
      actions are scaled linearly onto its bounds. Either way the size is checked here.
    - `success`: the key of the env's final `info` that says the task was done (gym-hil: "succeed"), or
      a function `success(info) -> bool`. Without it the verdict is guessed (info["is_success"], else
      "terminated with a positive reward", which counts any rewarded termination) and a warning says so.
    - `teleop(obs, policy_action)`: the intervention source; an action [4] in [-1, 1], or None.
    """

    def __init__(
        self,
        env,
        *,
        robot_id: str,
        task: str,
        prompt: str,
        control_hz: float = 10.0,
        observation_fn: Callable[[object], dict] | None = None,
        action_fn: Callable[[np.ndarray], object] | None = None,
        success: str | Callable[[dict], bool] | None = None,
        teleop: Callable[[dict, np.ndarray], np.ndarray | None] | None = None,
    ):
        if observation_fn is None and (why := _identity_observation_error(env.observation_space)):
            raise TypeError(
                f"{why}; pass observation_fn mapping the env's observation onto the schema (docs/robot.md)"
            )
        self.env, self.task, self.robot_id, self.control_hz = env, task, robot_id, control_hz
        self.prompt, self._tokens = prompt, tokenizer.encode(prompt)
        self._map = observation_fn or dict
        self._command = action_fn or _default_action_fn(env.action_space)
        _check_command(self._command, env.action_space)
        if success is None:
            warnings.warn(
                "GymRobot: no `success` given, so success is guessed: info['is_success'] if the env sets "
                "it, else 'terminated with reward > 0' (a rewarded failure counts too). Pass "
                "success='<info key>' or success=lambda info: ...",
                stacklevel=2,
            )
        self._success = success
        self._teleop = teleop
        self._obs, self._info, self._steps, self._last = None, {}, 0, Feedback(0.0, False, False)

    def reset(self, seed: int | None = None) -> dict:
        self._obs, self._info = self.env.reset(seed=seed)
        self._steps, self._last = 0, Feedback(0.0, False, False)
        return self.observe()

    def observe(self) -> dict:
        return {**self._map(self._obs), "prompt": self._tokens}

    def act(self, action: np.ndarray) -> Feedback:
        self._obs, reward, terminated, truncated, self._info = self.env.step(self._command(action))
        self._steps += 1
        self._last = Feedback(float(reward), bool(terminated), bool(truncated))
        return self._last

    def intervention(self, obs: dict, policy_action: np.ndarray) -> np.ndarray | None:
        return None if self._teleop is None else self._teleop(obs, policy_action)

    def succeeded(self) -> bool:
        """The finished episode's success, as `success` says (or guessed)."""
        if self._success is None:
            return _guessed_success(self._info, self._last)
        if callable(self._success):
            return bool(self._success(self._info))
        if self._success not in self._info:
            raise KeyError(
                f"success key {self._success!r} is not in the env's last info; its keys are "
                f"{sorted(self._info)}"
            )
        return bool(self._info[self._success])

    def outcome(self) -> dict:
        return {
            "success": self.succeeded(),
            "retries": 0,
            "cycle_time": self._steps / self.control_hz,
            "prompt": self.prompt,
        }


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
