"""The regression gate: candidate params are published only if they are not worse than the current ones.

An `Evaluation` scores an exported policy file (higher is better). The gate scores the candidate and the
current params the same way and passes the candidate unless its score is below the current score by more
than `margin`. Scores of files already seen are cached by sha256, so the current params are evaluated once.

`GATES` maps `fleet.gate` names to evaluation builders of a fleet and a target config. "sim" is the success
rate in the C-MuJoCo twin on held-out episodes (seeds the actors never draw), through the same numpy client
the robots run. A PRO score on held-out episodes can be registered here beside it (`GATES["pro"] = ...`).
"""

import hashlib
from collections.abc import Callable

Evaluation = Callable[[bytes], float]


def twin_success(task: str, split: str, seeds: range, replan: int = 1) -> Evaluation:
    """Success rate of a policy file in the twin, without operator, over the episodes `seeds` start."""

    def evaluate(data: bytes) -> float:
        from envs.twin_robot import TwinRobot
        from jaxvla.actor import policy as actor_policy
        from jaxvla.actor.runner import RateClock
        from jaxvla.actor.runner import run_episode

        policy, robot, clock = actor_policy.loads(data), TwinRobot(task, split), RateClock(0)
        wins = [
            run_episode(robot, policy, clock=clock, replan=replan, seed=s)["episode_metadata"]["success"]
            for s in seeds
        ]
        return sum(wins) / len(wins)

    return evaluate


def simulated(fleet, target) -> Evaluation:
    """The "sim" gate of a `configs.FleetConfig` on `target.task` / `target.split`."""
    return twin_success(
        target.task, target.split, range(fleet.gate_seed, fleet.gate_seed + fleet.gate_episodes)
    )


GATES: dict[str, Callable[[object, object], Evaluation]] = {"sim": simulated}


class Gate:
    """Compares candidates against the current params with one evaluation and a margin."""

    def __init__(self, evaluate: Evaluation, margin: float):
        self.evaluate, self.margin = evaluate, margin
        self._scores: dict[str, float] = {}

    def score(self, data: bytes) -> float:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self._scores:
            self._scores[digest] = float(self.evaluate(data))
        return self._scores[digest]

    def check(self, candidate: bytes, current: bytes) -> dict:
        """The verdict: both scores, the margin and whether the candidate may be published."""
        ours, theirs = self.score(candidate), self.score(current)
        return {
            "candidate": ours,
            "current": theirs,
            "margin": self.margin,
            "passed": ours >= theirs - self.margin,
        }


def make_gate(fleet, target) -> Gate:
    """The gate `fleet.gate` names, with `fleet.gate_margin`, on the task and split of `target`."""
    if fleet.gate not in GATES:
        raise KeyError(f"unknown gate {fleet.gate!r}; registered: {sorted(GATES)}")
    return Gate(GATES[fleet.gate](fleet, target), fleet.gate_margin)
