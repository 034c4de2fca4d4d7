"""`jaxvla recap [config] [--recap.field value ...]`: Recap on the split the prior fails on.

Loads the prior from `recap.prior` and the task's `train` demonstrations, then for every seed in
`recap.seeds` runs `learner.recap.run_recap`: iterations of autonomous episodes and operator-corrected
episodes (the `patch.*` takeover trigger), value training, advantages, indicator-conditioned policy
training, evaluation with the indicator positive. Writes to `out_dir/recap-<task>/`: `report.json`,
`report.md` (mean ± std over seeds next to the prior and policy patching), `recap.png` and one
`seed<N>/metrics.jsonl` per seed.
"""

import dataclasses
import pathlib
import sys

import jax

import configs
from envs.wrappers import Trigger
from jaxvla import models
from learner import evaluate
from learner import patch
from learner import recap
from tools import data
from tools import practice
from tools.patch import load_prior

PROG = "jaxvla recap"
# The autonomous arm: an operator who never takes over.
NEVER = Trigger(slip=float("inf"), force=float("inf"), on_failure_event=False, stall_steps=1 << 30)


ROWS = [
    ("episodes collected", "collected_episodes", "count"),
    ("corrective episodes (operator took over)", "corrective_episodes", "count"),
    ("operator takeover steps", "takeover_steps", "count"),
    ("success of the corrected episodes, with the operator (%)", "corrected_success", "percent"),
    ("success of the autonomous episodes (%)", "autonomous_success", "percent"),
    ("share of rollout steps positive, last iteration (%)", "rollout_positive_share", "percent"),
    ("success on `train` afterwards (%)", "train_success", "percent"),
]


def describe(config: configs.Config) -> str:
    """The run's settings in one paragraph, for the report."""
    rc = config.recap
    retrained = "from their initial weights" if rc.from_prior else "from the last iteration"
    return (
        f"Recap on {rc.task}/{rc.split} from the prior, seeds {list(rc.seeds)}: {rc.iterations} "
        f"iterations of {rc.autonomous_per_iteration} autonomous + {rc.corrected_per_iteration} "
        f"operator-corrected episodes; value ({config.model.value_bins} bins, {rc.value_steps} steps) and "
        f"policy ({rc.policy_steps} steps) retrained {retrained} each iteration on D = "
        f"{rc.offline_episodes} `train` demonstrations + every episode collected; N = {rc.advantage_steps}, "
        f"{rc.positive_fraction:.0%} of rollout steps and {rc.demo_positive_fraction:.0%} of demonstration "
        f"steps positive, corrections forced positive, indicator dropout {rc.indicator_dropout:.0%}, "
        f"beta {rc.guidance}; {rc.eval_episodes} evaluation episodes per iteration."
    )


def run_seeds(config: configs.Config, prior, offline: list[dict], out: pathlib.Path, *,
              train_eval: bool = True) -> tuple[dict, dict]:  # fmt: skip
    """Recap from `prior` once per seed in `recap.seeds`: every seed's records and its summary (with the
    final policy's success on `train` when `train_eval`)."""
    rc = config.recap
    graphdef, _ = recap.conditioned_policy(prior)
    positive = models.INDICATOR_POSITIVE
    collect = evaluate.chunk_actor(graphdef, prior.stats, indicator=positive, explore=rc.explore,
                                   guidance=rc.guidance)  # fmt: skip
    actor = evaluate.chunk_actor(graphdef, prior.stats, indicator=positive, guidance=rc.guidance)
    autonomous = patch.Collector(rc.task, rc.split, rc.autonomous_per_iteration, NEVER, collect)
    corrected = patch.Collector(
        rc.task, rc.split, rc.corrected_per_iteration, patch.trigger_of(config), collect
    )
    evaluator = evaluate.Evaluator(rc.task, rc.split, rc.eval_episodes, actor)
    on_train = evaluate.Evaluator(rc.task, "train", rc.eval_episodes, actor) if train_eval else None
    results, summaries = {}, {}
    for seed in rc.seeds:
        records, params = recap.run_recap(config, prior, offline, seed=seed, autonomous=autonomous,
                                          corrected=corrected, evaluator=evaluator,
                                          run_dir=out / f"seed{seed}")  # fmt: skip
        results[seed] = records
        summaries[seed] = {
            **practice.seed_summary(records, ("collected_episodes", "corrective_episodes", "takeover_steps")),
            "corrected_success": sum(r["corrected_success"] for r in records[1:]) / rc.iterations,
            "autonomous_success": sum(r["autonomous_success"] for r in records[1:]) / rc.iterations,
            "rollout_positive_share": records[-1]["rollout_positive_share"],
            "train_success": evaluate.summarize(on_train(params, jax.random.key(seed)))["success_rate"]
            if train_eval
            else None,
        }
        print({"seed": seed, **summaries[seed]}, flush=True)
    return results, summaries


def main(argv: list[str]) -> int:
    config = configs.cli(argv, prog=PROG)
    jax.config.update("jax_compilation_cache_dir", config.compile_cache)
    rc, pre = config.recap, config.pretrain
    out = pathlib.Path(config.out_dir) / f"recap-{rc.task}"
    prior = load_prior(rc.prior)
    offline = data.load_or_generate(pre.data_dir, rc.task, "train", rc.offline_episodes, seed=pre.seed)
    results, summaries = run_seeds(config, prior, offline, out)
    practice.write(
        out,
        "recap",
        "Recap",
        {"recap": dataclasses.asdict(rc)},
        describe(config),
        ROWS,
        results,
        summaries,
        f"Recap on {rc.task}/{rc.split}",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
