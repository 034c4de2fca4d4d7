"""The actor's control loop: one episode on a `RobotInterface` at a fixed rate, recorded as an RLDS episode.

Timing: `RateClock` schedules step k at start + k / hz on the monotonic clock and sleeps until then. A
step that overruns its period is counted and the loop continues at the next free slot (it never bursts
to catch up: a robot must not receive commands faster than its rate). Lateness (wake-up time minus the
scheduled time) is kept in a bounded window for percentiles. hz = 0 runs unthrottled (simulation).

Chunks: the policy returns an action chunk [H, A]; `ActionChunkBroker` executes `replan` of its actions,
one per control period, before inferring again. A teleop action replaces the policy's for its step and is
flagged `is_intervention`; the policy's proposal is kept as `policy_action`.

Checks: every observation is checked against the schema (`jaxvla.schema`) before the policy sees it, so
a wrong sensor mapping stops the robot before its first command, with the field named, and a sensor that
turns NaN stops it before a NaN command. Observations are stored in the schema's dtypes.
Standard library, numpy and the numpy-only `jaxvla.schema`.
"""

import collections
import time
import uuid

import numpy as np

from jaxvla import schema
from jaxvla.actor.policy import ActionChunkBroker
from jaxvla.actor.policy import Policy
from jaxvla.actor.robots import RobotInterface
from jaxvla.actor.wire import stack_steps


class RateClock:
    """Fixed-rate scheduling with measured lateness [s] over the last `window` ticks."""

    def __init__(self, hz: float, window: int = 10_000, clock=time.monotonic, sleep=time.sleep):
        self.period = 1.0 / hz if hz > 0 else 0.0
        self.lateness: collections.deque[float] = collections.deque(maxlen=window)
        self.overruns = 0
        self._clock, self._sleep = clock, sleep
        self._next: float | None = None

    def tick(self) -> None:
        """Returns at the start of the next control period."""
        now = self._clock()
        if self._next is None or self.period == 0.0:
            self._next = now
        elif now > self._next + self.period:  # the last step overran: skip to the next free slot
            self.overruns += 1
            self._next += self.period * np.floor((now - self._next) / self.period)
        if self._next > now:
            self._sleep(self._next - now)
        self.lateness.append(max(0.0, self._clock() - self._next))
        self._next += self.period

    def restart(self) -> None:
        """Forgets the schedule (between episodes, where the robot may wait arbitrarily long)."""
        self._next = None

    def percentiles(self, qs=(50, 99)) -> dict[str, float]:
        """Lateness percentiles in milliseconds, {"p50_ms": .., "p99_ms": ..}."""
        values = np.asarray(self.lateness) * 1e3
        return {f"p{q}_ms": float(np.percentile(values, q)) if values.size else 0.0 for q in qs}


def checked(obs: dict, step: int) -> dict:
    """`obs` if the schema accepts it, else ValueError naming the step and the field. Checked before the
    policy sees it: a wrong sensor mapping stops the robot before its first command, not after a whole
    episode the service then refuses, and a sensor that turns NaN never becomes a NaN command."""
    try:
        schema.check_observation(obs)
    except ValueError as err:
        raise ValueError(f"step {step}: {err}") from None
    return obs


def run_episode(
    robot: RobotInterface,
    policy: Policy,
    *,
    clock: RateClock,
    replan: int = 1,
    seed: int | None = None,
    max_steps: int = 2_000,
) -> dict:
    """One episode: the RLDS episode dict (jaxvla.episodes' schema) ready to push."""
    broker = ActionChunkBroker(policy, replan=replan)
    obs = checked(robot.reset(seed), 0)
    clock.restart()
    steps = []
    for t in range(max_steps):
        clock.tick()
        if t:
            obs = checked(robot.observe(), t)
        policy_action = np.asarray(broker.infer(obs)["actions"], np.float32)
        teleop = robot.intervention(obs, policy_action)
        action = policy_action if teleop is None else np.asarray(teleop, np.float32)
        feedback = robot.act(action)
        steps.append(
            {
                "observation": schema.as_schema_dtypes(obs),
                "action": action,
                "policy_action": policy_action,
                "reward": np.float32(feedback.reward),
                "discount": np.float32(0.0 if feedback.terminal else 1.0),
                "is_first": t == 0,
                "is_last": False,
                "is_terminal": bool(feedback.terminal),
                "is_intervention": teleop is not None,
                "failure_mode": np.int32(feedback.failure_mode),
                "events": np.asarray(feedback.events, bool),
            }
        )
        if feedback.terminal or feedback.truncated:
            break
    steps[-1]["is_last"] = True
    return episode_record(robot, steps, policy.version)


def episode_record(robot: RobotInterface, steps: list[dict], policy_version: int) -> dict:
    """Steps stacked over time plus the episode's metadata (source "patch" if the operator acted)."""
    outcome = robot.outcome()
    intervened = any(s["is_intervention"] for s in steps)
    metadata = {
        "episode_id": str(uuid.uuid4()),
        "robot_id": robot.robot_id,
        "task": robot.task,
        "prompt": outcome["prompt"],
        "policy_version": str(policy_version),
        "source": "patch" if intervened else "online",
        "success": bool(outcome["success"]),
        "operator_reward": float(outcome["success"]),
        "retries": int(outcome["retries"]),
        "cycle_time": float(outcome["cycle_time"]),
    }
    return {"steps": stack_steps(steps), "episode_metadata": metadata}
