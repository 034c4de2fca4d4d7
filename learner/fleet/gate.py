"""The regression gate: candidate params are published only if they are not worse than the current ones.

An `Evaluation` scores an exported policy file (higher is better). The gate scores the candidate and the
current params the same way and passes the candidate unless its score is below the current score by more
than `margin`. Scores of files already seen are cached by sha256, so the current params are evaluated once.
Monitors are further evaluations, each with its own margin, that the candidate must pass as well.

`GATES` maps `fleet.gate` names to builders of a gate from the fleet's and the target's configs (its task
and split):
- "sim": the success rate in the C-MuJoCo twin on held-out episodes (seeds the actors never draw), through
  the same numpy client the robots run;
- "sim+pro": the same, and beside it PRO's episode score (Cortex 1.6's deployment-quality monitor: the
  mean over steps of V - λρ) of those very episodes, so a candidate that still succeeds but more slowly,
  with more retries or nearer to failure is stopped too.
"""

import functools
import hashlib
from collections.abc import Callable

Evaluation = Callable[[bytes], float]


def twin_episodes(task: str, split: str, seeds: range, replan: int = 1) -> Callable[[bytes], list[dict]]:
    """A policy file's RLDS episodes in the twin, without operator, one per seed; the last few files' are
    kept, so the evaluations of one gate run them once."""

    @functools.lru_cache(maxsize=4)
    def run(data: bytes) -> list[dict]:
        from envs.twin_robot import TwinRobot
        from jaxvla.actor import policy as actor_policy
        from jaxvla.actor.runner import RateClock
        from jaxvla.actor.runner import run_episode

        policy, robot, clock = actor_policy.loads(data), TwinRobot(task, split), RateClock(0)
        return [run_episode(robot, policy, clock=clock, replan=replan, seed=s) for s in seeds]

    return run


def twin_success(episodes: Callable[[bytes], list[dict]]) -> Evaluation:
    """Success rate of a policy file's twin episodes."""

    def evaluate(data: bytes) -> float:
        wins = [ep["episode_metadata"]["success"] for ep in episodes(data)]
        return sum(wins) / len(wins)

    return evaluate


def pro_quality(episodes: Callable[[bytes], list[dict]], pro_dir: str, risk_weight: float) -> Evaluation:
    """Mean PRO episode score (V - λρ over each episode's steps) of a policy file's twin episodes."""
    from learner import pro

    model = pro.load(pro_dir)

    def evaluate(data: bytes) -> float:
        eps = episodes(data)
        return sum(pro.quality(r, risk_weight) for r in pro.score_episodes(model, eps)) / len(eps)

    return evaluate


def held_out_episodes(fleet, target) -> Callable[[bytes], list[dict]]:
    seeds = range(fleet.gate_seed, fleet.gate_seed + fleet.gate_episodes)
    return twin_episodes(target.task, target.split, seeds)


def simulated(fleet, target) -> "Gate":
    """The "sim" gate of a `configs.FleetConfig` on `target.task` / `target.split`."""
    return Gate(twin_success(held_out_episodes(fleet, target)), fleet.gate_margin)


def simulated_and_pro(fleet, target) -> "Gate":
    """The "sim+pro" gate: twin success, and PRO's episode score of the same episodes (`fleet.pro`)."""
    if not fleet.pro:
        raise ValueError('the "sim+pro" gate needs a trained PRO: --fleet.pro <folder of `jaxvla pro train`>')
    episodes = held_out_episodes(fleet, target)
    monitor = pro_quality(episodes, fleet.pro, fleet.pro_risk_weight)
    return Gate(twin_success(episodes), fleet.gate_margin, monitors={"pro": (monitor, fleet.pro_margin)})


GATES: dict[str, Callable[[object, object], "Gate"]] = {"sim": simulated, "sim+pro": simulated_and_pro}


class Gate:
    """Compares candidates against the current params with one evaluation and a margin, and any monitors
    ({name: (evaluation, margin)}), which the candidate must pass too."""

    def __init__(self, evaluate: Evaluation, margin: float, monitors: dict | None = None):
        self.evaluate, self.margin = evaluate, margin
        self.monitors = monitors or {}
        self._scores: dict[tuple[str, str], float] = {}

    def score(self, data: bytes, name: str = "", evaluate: Evaluation | None = None) -> float:
        key = (name, hashlib.sha256(data).hexdigest())
        if key not in self._scores:
            self._scores[key] = float((evaluate or self.evaluate)(data))
        return self._scores[key]

    def check(self, candidate: bytes, current: bytes) -> dict:
        """The verdict: both scores, the margin and whether the candidate may be published; with monitors,
        each one's verdict under "monitors", and "passed" only if every one passed."""
        verdict = compare(self.score(candidate), self.score(current), self.margin)
        if self.monitors:
            verdict["monitors"] = {
                name: compare(self.score(candidate, name, fn), self.score(current, name, fn), margin)
                for name, (fn, margin) in self.monitors.items()
            }
            verdict["passed"] = verdict["passed"] and all(m["passed"] for m in verdict["monitors"].values())
        return verdict


def compare(candidate: float, current: float, margin: float) -> dict:
    passed = candidate >= current - margin
    return {"candidate": candidate, "current": current, "margin": margin, "passed": passed}


def make_gate(fleet, target) -> Gate:
    """The gate `fleet.gate` names, with `fleet.gate_margin`, on the task and split of `target`."""
    if fleet.gate not in GATES:
        raise KeyError(f"unknown gate {fleet.gate!r}; registered: {sorted(GATES)}")
    return GATES[fleet.gate](fleet, target)
