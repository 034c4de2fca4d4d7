"""The C-MuJoCo twin as a `jaxvla.actor.RobotInterface`, with the scripted operator as its teleop device.

A simulated robot for `jaxvla actor`: mujoco and numpy, no jax. With a `Trigger`, the scripted operator
watches every step and takes over at the first sign of failure, exactly as `envs.wrappers.Takeover` does
in MJX (the same `takeover_alarm` / `takeover_flags` functions), and hands back once the situation is calm.
"""

import numpy as np

from envs import operator
from envs.operator import Trigger
from envs.twin import Twin
from jaxvla.actor.robots import Feedback
from jaxvla.actor.robots import RobotInterface


def prompt_text(spec, tokens: np.ndarray) -> str:
    """The goal text whose tokens the episode's parameters hold."""
    rows = np.flatnonzero(np.all(spec.prompt_tokens() == np.asarray(tokens), axis=1))
    return spec.prompts[int(rows[0])] if rows.size else ""


class TwinRobot(RobotInterface):
    """One twin cell. `trigger` None: no operator (the policy alone)."""

    def __init__(
        self,
        task: str = "pick_place",
        split: str = "train",
        *,
        robot_id: str = "twin-0",
        trigger: Trigger | None = None,
    ):
        self.twin = Twin(task, split)
        self.task, self.robot_id, self.trigger = task, robot_id, trigger
        self.control_hz = float(self.twin.config.control_hz)
        self._prompt = ""
        self._takeover: dict = {}
        self._alarm = np.bool_(False)

    def reset(self, seed: int | None = None) -> dict:
        state = self.twin.reset(seed)
        self._prompt = prompt_text(self.twin.spec, state.params.prompt)
        self._takeover = operator.takeover_start(np)
        self._alarm = np.bool_(False)
        return state.obs

    def observe(self) -> dict:
        return self.twin.state.obs

    def intervention(self, obs: dict, policy_action: np.ndarray) -> np.ndarray | None:
        if self.trigger is None:
            return None
        command = self.twin.operator_action()
        info = {**self.twin.state.info, **self._takeover}
        self._alarm = operator.takeover_alarm(np, self.trigger, info, policy_action, command)
        return command if bool(self._takeover["intervening"] | self._alarm) else None

    def act(self, action: np.ndarray) -> Feedback:
        before = {**self.twin.state.info, **self._takeover}
        state = self.twin.step(action)
        if self.trigger is not None:
            flags = operator.takeover_flags(
                np, self.trigger, before, self._alarm, state.info["stage"], state.done
            )
            self._takeover = {k: flags[k] for k in self._takeover}
            self._alarm = np.bool_(False)
        info = state.info
        return Feedback(
            float(state.reward),
            bool(state.done),
            bool(state.truncated) and not bool(state.done),
            int(info["failure_mode"]),
            np.asarray(info["events"], bool),
        )

    def outcome(self) -> dict:
        return {**operator.label(self.twin.state.info), "prompt": self._prompt}
