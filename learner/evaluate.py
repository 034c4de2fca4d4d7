"""Policy evaluation in MJX: a batch of episodes as one jitted, vmapped rollout, then the figures.

The figures are the ones DESIGN.md section 7 compares methods on: success rate, failure modes, retries
per episode, cycle time, recovery success after a first failure, throughput (successes per simulated
hour of back-to-back episodes), each broken down by the split's mixture components.

Comparisons are paired: every method and every round is scored on the same fixed contexts, `TEST`, and
anything that selects (a gate, early stopping, "rounds to reach X") reads the disjoint `VALIDATION` set.
A context is the whole episode: its reset key fixes the item, the layout and the observation noise, and
the deterministic policy needs no other randomness.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

import envs
from envs.rollout import rollout
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from jaxvla.schema import FAILURE_MODES

# (params, obs {k: [B, ...]}, key) -> action [B, A]
Actor = Callable[[object, dict, jax.Array], jax.Array]
# (params, env state [B], key) -> action [B, A]: an actor that reads more than the observation
StateActor = Callable[[object, object, jax.Array], jax.Array]


def chunk_actor(graphdef, stats: dict, *, indicator: int | None = None, explore: bool = False) -> Actor:
    """Executes the first action of a chunk each step (receding horizon): the policy's deterministic
    chunk, or with `explore` a chunk sampled from it (SAC's exploration during patching rollouts).
    Recap's guided policy has its own actors (`learner.recap.guided_actor`, `rollout_actor`)."""

    def act(params, obs, key):
        obs = normalization.normalize(obs, stats)
        flag = None if indicator is None else jnp.full(obs["prompt"].shape[:1], indicator, jnp.int32)
        mean, log_std = models.apply(graphdef, params, obs, flag)
        chunk = distributions.sample(key, mean, log_std)[0] if explore else distributions.mode(mean)
        return chunk[:, 0]

    return act


@dataclasses.dataclass(frozen=True)
class Contexts:
    """A fixed set of evaluation contexts: `episodes` reset keys drawn from `seed`."""

    name: str
    seed: int
    episodes: int

    @property
    def key(self) -> jax.Array:
        """The key an `Evaluator` of `episodes` episodes turns into exactly these contexts."""
        return jax.random.key(self.seed)

    def with_episodes(self, episodes: int) -> "Contexts":
        return dataclasses.replace(self, episodes=episodes)


# Recorded in every report. Distinct seeds give disjoint key streams (tests/test_evaluate.py checks the
# contexts themselves differ).
TEST = Contexts("test", seed=20_261_129, episodes=256)
VALIDATION = Contexts("validation", seed=31_415_926, episodes=128)


def on_host(params):
    """The host's copy of `params`, for the rollouts: params replicated over the mesh (a learner's) and
    params on one device (a loaded prior's) would each compile the same rollout, and a replicated
    rollout is run once per device."""
    return jax.device_get(params)


def reset_keys(key: jax.Array, episodes: int) -> jax.Array:
    """[episodes] reset keys: the contexts an evaluation of `episodes` episodes under `key` runs."""
    return jax.random.split(key, episodes)


def context_keys(contexts: Contexts) -> jax.Array:
    """The reset keys of a fixed context set, as an `Evaluator` of its size derives them."""
    return reset_keys(jax.random.split(contexts.key)[0], contexts.episodes)


def outcomes(last) -> dict:
    """Per-episode outcomes {name: [B]} from a batch's last states: what `summarize` reads."""
    info = last.info
    return {
        "success": info["success"],
        "failure_mode": info["failure_mode"],
        "retries": info["retries"],
        "had_failure": info["had_failure"],
        "cycle_time": info["cycle_time"],
        "component": last.params.component,
    }


def report_on(contexts: Contexts, outcomes: dict[str, np.ndarray], task: str, split: str) -> dict:
    """The report of one run on a fixed context set (outcomes [episodes] as numpy), labelled with it."""
    report = summarize(outcomes, envs.get_task(task).split(split).component_names)
    return {"contexts": contexts.name, "contexts_seed": contexts.seed, **report}


class Evaluator:
    """`episodes` episodes of one task and split, compiled once, run for any params of the same shape."""

    def __init__(
        self,
        task: str,
        split: str,
        episodes: int,
        actor: Actor | None = None,
        *,
        camera_res: int | None = None,
        state_actor: StateActor | None = None,
        wrap=None,
    ):
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
            state = reset(reset_keys(key_reset, self.episodes))
            last, _ = rollout(step, lambda s, k: actor(params, s, k), state, key_act, self.length)
            return outcomes(last)

        return run

    def __call__(self, params, key: jax.Array) -> dict[str, np.ndarray]:
        """Per-episode outcomes {name: [episodes]} as numpy."""
        return jax.tree.map(np.asarray, self._run(on_host(params), key))

    def on(self, params, contexts: Contexts) -> dict:
        """The summary on a fixed context set; the evaluator must have been built for its size."""
        if contexts.episodes != self.episodes:
            raise ValueError(
                f"{contexts.name} holds {contexts.episodes} contexts; this evaluator runs {self.episodes}"
            )
        return report_on(contexts, self(params, contexts.key), self.task, self.split)


def run_evaluators(
    task: str, split: str, episodes: int, actor: Actor, *, train_eval: bool, novel_eval: bool, own=None
) -> tuple:
    """A method's evaluators: on its own split, then for its final policy on `train` and on `novel` where
    asked (None otherwise). A run on `novel` scores its final policy with its own evaluator. `own`: the
    evaluator on the split when the method brings one (Recap's `Rollouts`), else an `Evaluator` of `actor`."""
    evaluator = own if own is not None else Evaluator(task, split, episodes, actor)
    on_train = Evaluator(task, "train", episodes, actor) if train_eval else None
    on_novel = None
    if novel_eval:
        on_novel = evaluator if split == "novel" else Evaluator(task, "novel", episodes, actor)
    return evaluator, on_train, on_novel


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a binomial rate; it stays inside [0, 1] at 0 or n successes."""
    if trials == 0:
        return 0.0, 1.0
    interval = scipy.stats.binomtest(successes, trials).proportion_ci(level, method="wilson")
    return float(interval.low), float(interval.high)


def bootstrap_interval(values, *, level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """A percentile bootstrap interval of the mean of `values` (one per seed)."""
    values = np.asarray([v for v in values if v is not None], np.float64)
    if len(values) == 0:
        return None
    if len(values) == 1 or np.ptp(values) == 0:
        return float(values[0]), float(values[0])
    result = scipy.stats.bootstrap(
        (values,), np.mean, confidence_level=level, method="percentile", n_resamples=10_000, random_state=seed
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def headline(records: list[dict]) -> dict:
    """The figures a run is reported by: its final evaluation with a Wilson interval, and the mean of its
    last 3 (never the best round: the maximum of noisy evaluations is biased upwards)."""
    final = records[-1]
    successes = round(final["success_rate"] * final["episodes"])
    last = [r["success_rate"] for r in records[-3:]]
    return {
        "final": final["success_rate"],
        "final_ci": wilson_interval(successes, final["episodes"]),
        "last3_mean": float(np.mean(last)),
    }


def summarize(outcomes: dict[str, np.ndarray], components: tuple[str, ...] = ()) -> dict:
    """The report for one task and split, as plain Python numbers (JSON-ready); with the split's
    component names, also the success and failures of each component."""
    report = _figures(outcomes)
    if len(components) > 1:
        report["by_component"] = {
            name: _figures({k: v[outcomes["component"] == i] for k, v in outcomes.items()}, brief=True)
            for i, name in enumerate(components)
        }
    return report


def _figures(outcomes: dict[str, np.ndarray], brief: bool = False) -> dict:
    success = outcomes["success"].astype(bool)
    n = len(success)
    failed = ~success
    modes = {
        name: int(np.sum(failed & (outcomes["failure_mode"] == i))) for i, name in enumerate(FAILURE_MODES)
    }
    modes.pop("none")
    failures = {k: v for k, v in modes.items() if v}
    if brief:
        rate = float(np.mean(success)) if n else None
        return {
            "episodes": n,
            "success_rate": rate,
            "failures": int(np.sum(failed)),
            "failure_modes": failures,
        }
    recovering = outcomes["had_failure"].astype(bool)
    hours = float(np.sum(outcomes["cycle_time"])) / 3600.0
    return {
        "episodes": n,
        "success_rate": float(np.mean(success)),
        "success_ci": wilson_interval(int(np.sum(success)), n),
        "failure_modes": failures,
        "retries_per_episode": float(np.mean(outcomes["retries"])),
        "cycle_time_s": float(np.mean(outcomes["cycle_time"][success])) if success.any() else None,
        "recovery_rate": float(np.mean(success[recovering])) if recovering.any() else None,
        "episodes_with_failure": int(np.sum(recovering)),
        "throughput_per_hour": float(np.sum(success)) / hours if hours > 0 else 0.0,
    }


def format_table(rows: dict[tuple[str, str], dict]) -> str:
    """One line per (task, split), then one per mixture component: the report as a fixed-width table."""
    columns = (
        ("n", 4),
        ("success", 8),
        ("95% CI", 13),
        ("retries", 8),
        ("cycle s", 8),
        ("recover", 8),
        ("succ/h", 7),
    )
    header = (
        f"{'task':<11} {'split':<9} " + " ".join(f"{name:>{width}}" for name, width in columns) + "  failures"
    )
    lines = [header, "-" * len(header)]
    for (task, split), r in rows.items():
        cycle = f"{r['cycle_time_s']:.1f}" if r["cycle_time_s"] is not None else "-"
        recover = f"{r['recovery_rate']:.0%}" if r["recovery_rate"] is not None else "-"
        ci = "{:.1%}-{:.1%}".format(*r["success_ci"]) if "success_ci" in r else "-"
        lines.append(
            f"{task:<11} {split:<9} {r['episodes']:>4} {r['success_rate']:>8.1%} {ci:>13} "
            f"{r['retries_per_episode']:>8.2f} {cycle:>8} {recover:>8} {r['throughput_per_hour']:>7.0f}  "
            f"{_failure_list(r['failure_modes'])}"
        )
        for name, c in r.get("by_component", {}).items():
            rate = f"{c['success_rate']:>8.1%}" if c["success_rate"] is not None else f"{'-':>8}"
            lines.append(
                f"{'':<11} {'- ' + name:<9} {c['episodes']:>4} {rate} {'':>13} {'':>8} {'':>8} {'':>8} "
                f"{'':>7}  {_failure_list(c['failure_modes'])}"
            )
    return "\n".join(lines)


def _failure_list(modes: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(modes.items(), key=lambda kv: -kv[1])) or "-"
