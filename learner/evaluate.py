"""Policy evaluation in MJX: a batch of episodes as one jitted, vmapped rollout, then the figures.

The figures are the ones DESIGN.md section 7 compares methods on: success rate, failure modes, retries
per episode, cycle time, recovery success after a first failure, throughput (successes per simulated
hour of back-to-back episodes).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import envs
from envs.cell import FAILURE_MODES
from envs.rollout import rollout
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions

# (params, obs {k: [B, ...]}, key) -> action [B, A]
Actor = Callable[[object, dict, jax.Array], jax.Array]
# (params, env state [B], key) -> action [B, A]: an actor that reads more than the observation
StateActor = Callable[[object, object, jax.Array], jax.Array]


def chunk_actor(graphdef, stats: dict, *, indicator: int | None = None, explore: bool = False,
                guidance: float = 1.0) -> Actor:  # fmt: skip
    """Executes the first action of a chunk each step (receding horizon): the policy's deterministic
    chunk, or with `explore` a chunk sampled from it (SAC's exploration during patching rollouts).
    `guidance` != 1 with an indicator: classifier-free guidance against the indicator-free policy."""

    def act(params, obs, key):
        obs = normalization.normalize(obs, stats)
        flag = None if indicator is None else jnp.full(obs["prompt"].shape[:1], indicator, jnp.int32)
        mean, log_std = models.apply(graphdef, params, obs, flag)
        if indicator is not None and guidance != 1.0:
            unconditioned, _ = models.apply(graphdef, params, obs, None)
            mean = distributions.guided_mean(mean, unconditioned, guidance)
        chunk = distributions.sample(key, mean, log_std)[0] if explore else distributions.mode(mean)
        return chunk[:, 0]

    return act


class Evaluator:
    """`episodes` episodes of one task and split, compiled once, run for any params of the same shape."""

    def __init__(self, task: str, split: str, episodes: int, actor: Actor | None = None, *,
                 camera_res: int | None = None, state_actor: StateActor | None = None,
                 wrap=None):  # fmt: skip
        """Give `actor` (reads observations) or `state_actor` (reads the env state: history, step...);
        `wrap(env) -> env` adds wrappers such a state actor needs."""
        if (actor is None) == (state_actor is None):
            raise ValueError("give exactly one of actor and state_actor")
        overrides = {"camera": True, "camera_res": camera_res} if camera_res else {}
        self.env = envs.make(task, split, **overrides)
        if wrap is not None:
            self.env = wrap(self.env)
        self.task, self.split, self.episodes = task, split, episodes
        self.length = self.env.config.max_steps
        state_actor = state_actor or (lambda params, s, k: actor(params, s.obs, k))
        self._run = jax.jit(self._episodes_fn(state_actor))

    def _episodes_fn(self, actor: StateActor):
        reset, step = jax.vmap(self.env.reset), jax.vmap(self.env.step)

        def run(params, key):
            key_reset, key_act = jax.random.split(key)
            state = reset(jax.random.split(key_reset, self.episodes))
            last, _ = rollout(step, lambda s, k: actor(params, s, k), state, key_act, self.length)
            info = last.info
            return {
                "success": info["success"],
                "failure_mode": info["failure_mode"],
                "retries": info["retries"],
                "had_failure": info["had_failure"],
                "cycle_time": info["cycle_time"],
            }

        return run

    def __call__(self, params, key: jax.Array) -> dict[str, np.ndarray]:
        """Per-episode outcomes {name: [episodes]} as numpy."""
        return jax.tree.map(np.asarray, self._run(params, key))


def summarize(outcomes: dict[str, np.ndarray]) -> dict:
    """The report for one task and split, as plain Python numbers (JSON-ready)."""
    success = outcomes["success"].astype(bool)
    n = len(success)
    failed = ~success
    modes = {
        name: int(np.sum(failed & (outcomes["failure_mode"] == i))) for i, name in enumerate(FAILURE_MODES)
    }
    modes.pop("none")
    recovering = outcomes["had_failure"].astype(bool)
    hours = float(np.sum(outcomes["cycle_time"])) / 3600.0
    return {
        "episodes": n,
        "success_rate": float(np.mean(success)),
        "failure_modes": {k: v for k, v in modes.items() if v},
        "retries_per_episode": float(np.mean(outcomes["retries"])),
        "cycle_time_s": float(np.mean(outcomes["cycle_time"][success])) if success.any() else None,
        "recovery_rate": float(np.mean(success[recovering])) if recovering.any() else None,
        "episodes_with_failure": int(np.sum(recovering)),
        "throughput_per_hour": float(np.sum(success)) / hours if hours > 0 else 0.0,
    }


def format_table(rows: dict[tuple[str, str], dict]) -> str:
    """One line per (task, split): the report as a fixed-width table."""
    columns = ("n", 4), ("success", 8), ("retries", 8), ("cycle s", 8), ("recover", 8), ("succ/h", 7)
    header = (
        f"{'task':<11} {'split':<6} " + " ".join(f"{name:>{width}}" for name, width in columns) + "  failures"
    )
    lines = [header, "-" * len(header)]
    for (task, split), r in rows.items():
        cycle = f"{r['cycle_time_s']:.1f}" if r["cycle_time_s"] is not None else "-"
        recover = f"{r['recovery_rate']:.0%}" if r["recovery_rate"] is not None else "-"
        failures = ", ".join(f"{k} {v}" for k, v in sorted(r["failure_modes"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"{task:<11} {split:<6} {r['episodes']:>4} {r['success_rate']:>8.1%} "
            f"{r['retries_per_episode']:>8.2f} {cycle:>8} {recover:>8} {r['throughput_per_hour']:>7.0f}  "
            f"{failures or '-'}"
        )
    return "\n".join(lines)
