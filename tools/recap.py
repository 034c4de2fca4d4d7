"""`jaxvla recap [config] [--recap.field value ...]`: Recap on `deploy`, where most autonomous episodes
succeed and the value can tell good from bad.

Loads the prior from `target.prior` and the task's `train` demonstrations, then for every seed in
`target.seeds` runs `learner.recap.run_recap`: iterations of autonomous episodes and operator-corrected
episodes (the `operator.*` takeover trigger), each into its own source of the sharded replay, value
training, advantages, indicator-conditioned policy training on batches drawn from the replay 50:50 from
demonstrations and collected steps (`recap.demo_share`), evaluation with the indicator positive on the
fixed test contexts. The final policy is then evaluated at every guidance weight beta in
`recap.guidance_sweep`, and on `novel`. Writes to `out_dir/recap-<task>/`: `report.json`, `report.md`
(headline with intervals, each seed, the iterations with the advantage's AUROC for episode success, the
beta sweep, throughput and tail failures against the targets), `recap.png` and one `seed<N>/metrics.jsonl`
per seed.
"""

import dataclasses
import pathlib
import sys

import numpy as np

import configs
from learner import compile_cache
from learner import evaluate
from learner import patch
from learner import pretrain
from learner import recap
from tools import reporting

PROG = "jaxvla recap"
# This command's defaults where they differ from the named config's (which `jaxvla demo` also reads).
DEFAULTS = {"target": {"eval_episodes": 64}}
SECTIONS = ("target", "recap", "operator", "pretrain")
TAILS = ("physics", "layout")  # `deploy`'s tail components (envs/tasks.py)

ROWS = [
    ("episodes collected", "collected_episodes", "count"),
    ("corrective episodes (operator took over)", "corrective_episodes", "count"),
    ("operator takeover steps", "takeover_steps", "count"),
    ("success of the corrected episodes, with the operator (%)", "corrected_success", "percent"),
    ("success of the autonomous episodes (%)", "autonomous_success", "percent"),
    ("share of rollout steps positive, last iteration (%)", "rollout_positive_share", "percent"),
    ("advantage AUROC for episode success, last iteration", "advantage_auroc", "value"),
    ("the same on the new episodes, before the value saw them", "advantage_auroc_heldout", "value"),
    ("tail failures, start (physics + layout)", "start_tail_failures", "value"),
    ("tail failures, final", "final_tail_failures", "value"),
    ("tail failures, final / start", "tail_failure_ratio", "value"),
    ("success on `train` afterwards (%)", "train_success", "percent"),
]
COLUMNS = [
    ("autonomous episodes succeeding (%)", "autonomous_success", "percent"),
    ("positive steps (%)", "positive_share", "percent"),
    ("advantage AUROC", "advantage_auroc", "value"),
    ("AUROC held out", "advantage_auroc_heldout", "value"),
    ("value error", "value_error", "value"),
    ("throughput", "throughput_per_hour", "count"),
]


def describe(config: configs.Config) -> str:
    """The run's settings in one paragraph, for the report."""
    tc, rc = config.target, config.recap
    retrained = "from their initial weights" if rc.from_prior else "from the last iteration"
    return (
        f"Recap on {tc.task}/{tc.split} from the prior, seeds {list(tc.seeds)}: {rc.iterations} "
        f"iterations of {rc.autonomous_per_iteration} autonomous + {rc.corrected_per_iteration} "
        f"operator-corrected episodes; value ({config.model.value_bins} bins, {rc.value_steps} steps) and "
        f"policy ({rc.policy_steps} steps) retrained {retrained} each iteration on D = "
        f"{rc.offline_episodes} `train` demonstrations + every episode collected, batches "
        f"{rc.demo_share:.0%} demonstrations : {1 - rc.demo_share:.0%} collected; N = {rc.advantage_steps}, "
        f"{rc.positive_fraction:.0%} of rollout steps and {rc.demo_positive_fraction:.0%} of demonstration "
        f"steps positive, corrections forced positive, indicator dropout {rc.indicator_dropout:.0%}, "
        f"beta {rc.guidance} during the run, swept over {list(rc.guidance_sweep)} at the end; "
        f"{tc.eval_episodes} test contexts per evaluation."
    )


def tail_failures(failures: dict[str, int]) -> int:
    return sum(failures.get(name, 0) for name in TAILS)


def run_seeds(
    config: configs.Config,
    prior,
    offline: list[dict],
    out: pathlib.Path,
    *,
    train_eval: bool = True,
    novel_eval: bool = True,
) -> tuple[dict, dict]:
    """Recap from `prior` once per seed in `target.seeds`: every seed's records and its summary (the beta
    sweep; the final policy's success on `train` when `train_eval`, on `novel` when `novel_eval`)."""
    tc, rc = config.target, config.recap
    graphdef, _ = recap.conditioned_policy(prior)
    # Collecting and evaluating on the split: one compiled program. `train` and `novel` are other MJX
    # models, so they have their own.
    rollouts = recap.Rollouts(
        tc.task,
        tc.split,
        graphdef,
        prior.stats,
        config.operator,
        autonomous=rc.autonomous_per_iteration,
        corrected=rc.corrected_per_iteration,
        episodes=tc.eval_episodes,
        explore=rc.explore,
        guidance=rc.guidance,
    )
    actor = recap.guided_actor(graphdef, prior.stats)
    _, on_train, on_novel = evaluate.run_evaluators(
        tc.task, tc.split, tc.eval_episodes, actor, train_eval=train_eval, novel_eval=novel_eval, own=rollouts
    )
    test = evaluate.TEST.with_episodes(tc.eval_episodes)
    results, summaries = {}, {}
    for seed in tc.seeds:
        records, params = recap.run_recap(
            config,
            prior,
            offline,
            seed=seed,
            rollouts=rollouts,
            run_dir=out / f"seed{seed}",
        )
        results[seed] = records
        summary = reporting.seed_summary(
            records, ("collected_episodes", "corrective_episodes", "takeover_steps")
        )
        sweep = recap.guidance_sweep(rollouts, params, rc.guidance_sweep)
        start_tail, final_tail = (
            tail_failures(summary["start_failures"]),
            tail_failures(summary["final_failures"]),
        )
        summaries[seed] = {
            **summary,
            "corrected_success": float(np.mean([r.get("corrected_success", np.nan) for r in records[1:]])),
            "autonomous_success": float(np.mean([r.get("autonomous_success", np.nan) for r in records[1:]])),
            "rollout_positive_share": records[-1].get("rollout_positive_share"),
            "advantage_auroc": records[-1].get("advantage_auroc"),
            "advantage_auroc_heldout": records[-1].get("advantage_auroc_heldout"),
            "start_tail_failures": start_tail,
            "final_tail_failures": final_tail,
            "tail_failure_ratio": final_tail / start_tail if start_tail else None,
            "guidance_sweep": {
                beta: {k: r[k] for k in ("success_rate", "success_ci", "throughput_per_hour")}
                | {"tail_failures": tail_failures(reporting.component_failures(r))}
                for beta, r in sweep.items()
            },
            "train_success": on_train.on(recap.with_beta(params, rc.guidance), test)["success_rate"]
            if train_eval
            else None,
            "novel_success": on_novel.on(recap.with_beta(params, rc.guidance), test)["success_rate"]
            if novel_eval
            else None,
        }
        print({"seed": seed, **summaries[seed]}, flush=True)
    return results, summaries


def sweep_table(summaries: dict, betas: tuple[float, ...]) -> str:
    """The final policies at each beta: success, throughput relative to the start, tail failures."""
    lines = ["| beta | success (%) | throughput / start | tail failures / start |", "|---:|---:|---:|---:|"]
    for beta in map(str, betas):
        at = [(s["guidance_sweep"][beta], s) for s in summaries.values()]
        ratio = [
            r["throughput_per_hour"] / s["start_throughput_per_hour"]
            for r, s in at
            if s["start_throughput_per_hour"]
        ]
        tails = [r["tail_failures"] / s["start_tail_failures"] for r, s in at if s["start_tail_failures"]]
        lines.append(
            f"| {beta} | {reporting.figure([r['success_rate'] for r, _ in at], 'percent')} | "
            f"{reporting.figure(ratio)} | {reporting.figure(tails)} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    config = configs.cli(argv, PROG, sections=SECTIONS, defaults=DEFAULTS)
    compile_cache.enable(config.compile_cache)
    config, prior = pretrain.load_target(config, PROG)
    tc, rc = config.target, config.recap
    out = pathlib.Path(config.out_dir) / f"recap-{tc.task}"
    offline = patch.demonstrations(config, "train", rc.offline_episodes)
    results, summaries = run_seeds(config, prior, offline, out)
    settings = {"target": dataclasses.asdict(tc), "recap": dataclasses.asdict(rc)}
    report = reporting.write(
        out,
        "recap",
        "Recap",
        settings,
        describe(config),
        ROWS,
        COLUMNS,
        results,
        summaries,
        f"Recap on {tc.task}/{tc.split}",
    )
    sweep = "\n## Classifier-free guidance at evaluation (final policies)\n\n" + sweep_table(
        summaries, rc.guidance_sweep
    )
    (out / "report.md").write_text(report + sweep)
    print(sweep)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
