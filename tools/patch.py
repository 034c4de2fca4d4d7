"""`jaxvla patch [config] [--patch.field value ...]`: policy patching against its baselines, paired.

Loads the prior from `target.prior`, then for every seed in `target.seeds` runs every arm on `target.task` /
`target.split` (the `deploy` mixture by default): policy patching (operator takeovers, SAC updates) and
the baselines in `patch.baselines`: full SFT retraining on operator demonstrations of the split, targeted
SFT on demonstrations of its tail components, and HG-DAgger on the operator's takeover segments.

Every evaluation of every arm scores the same fixed test contexts, and effort to the goal is read on
the disjoint validation contexts (`learner.evaluate.TEST` / `VALIDATION`). Headline figures are the final
policy and the mean of the last 3 evaluations, with a Wilson interval per run and a bootstrap interval
over seeds; never the best round. Every arm's final policy is also scored on the `novel` stress split.

Writes to `out_dir/patch-<task>-<split>/`: `report.json` (every record), `report.md` (the tables),
`patch.png` (success against operator steps, corrective episodes and environment steps, every arm and
seed) and one run folder per seed with the learner's checkpoints, so rerunning the command resumes.
"""

import dataclasses
import json
import pathlib
import sys

import configs
from envs.operator import Trigger
from learner import compile_cache
from learner import evaluate
from learner import patch
from learner import pretrain
from tools import pro as pro_tool
from tools import reporting

PROG = "jaxvla patch"
# What it reads: `pretrain` for the SFT arms' data and optimiser, `pro` for its reward and ranking.
SECTIONS = ("target", "patch", "sac", "operator", "pretrain", "pro")
ARMS = {
    "patch": "policy patching",
    "sft": "full SFT retraining",
    "targeted_sft": "targeted SFT (tail demonstrations)",
    "hg_dagger": "HG-DAgger (takeover segments)",
}
EFFORT = ("corrective_episodes", "takeover_segments", "takeover_steps", "env_steps", "wall_s")


def arm_summary(records: list[dict], goal: float) -> dict:
    """One arm of one seed: its headline on the test contexts and its effort to `goal` on validation."""
    reached = reporting.first_reaching(records, goal, "validation_success")
    final = records[-1]
    return {
        **evaluate.headline(records),
        "train_component": final.get("by_component", {}).get("train", {}).get("success_rate"),
        **{f"{k}_to_goal": reached[k] if reached else None for k in EFFORT},
        **{f"final_{k}": final[k] for k in ("recovery_rate", "retries_per_episode", "cycle_time_s")},
        "false_alarm_rate": final.get("false_alarm_rate"),
        "median_segment_steps": final.get("median_segment_steps"),
    }


def ratio(numerator, denominator):
    return numerator / denominator if numerator is not None and denominator else None


def seed_summary(arms: dict[str, list[dict]], goal: float) -> dict:
    """Every arm of one seed, and the baselines' effort to the goal over patching's."""
    summary = {name: arm_summary(records, goal) for name, records in arms.items() if records}
    if "patch" in summary:
        for name in summary.keys() - {"patch"}:
            for k in ("corrective_episodes", "takeover_steps"):
                summary[name][f"{k}_over_patch"] = ratio(
                    summary[name][f"{k}_to_goal"], summary["patch"][f"{k}_to_goal"]
                )
    return summary


def arm_table(summaries: dict, goal: float) -> list[str]:
    columns = [
        ("final success (%)", "final", True),
        ("last-3 mean (%)", "last3_mean", True),
        ("train component (%)", "train_component", True),
        ("novel, final (%)", "novel", True),
        ("recovery after a failure, final (%)", "final_recovery_rate", True),
        ("retries per episode, final", "final_retries_per_episode", False),
        ("cycle time, final (s)", "final_cycle_time_s", False),
        ("corrective episodes to goal", "corrective_episodes_to_goal", False),
        ("operator steps to goal", "takeover_steps_to_goal", False),
        ("env steps to goal", "env_steps_to_goal", False),
        ("corrective episodes / patching's", "corrective_episodes_over_patch", False),
        ("operator steps / patching's", "takeover_steps_over_patch", False),
    ]
    lines = ["| arm | " + " | ".join(name for name, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for arm, title in ARMS.items():
        per_seed = [s[arm] for s in summaries.values() if arm in s]
        if per_seed:
            cells = [reporting.over_seeds([s.get(key) for s in per_seed], pct) for _, key, pct in columns]
            lines.append(f"| {title} | " + " | ".join(cells) + " |")
    return [
        f"Goal: {goal:.0%} on the validation contexts. Mean over seeds [bootstrap 95% interval].",
        "",
        *lines,
    ]


def prior_table(prior: dict) -> list[str]:
    """The prior on the test contexts, by component (the calibration the split was built to)."""
    lines = ["| contexts | episodes | success (%) | 95% CI | failures |", "|---|---:|---:|---|---|"]
    rows = [("all", prior), *prior.get("by_component", {}).items()]
    for name, r in rows:
        ci = r.get("success_ci")
        ci_text = f"{100 * ci[0]:.1f}-{100 * ci[1]:.1f}" if ci else "-"
        failures = ", ".join(f"{k} {v}" for k, v in r["failure_modes"].items()) or "-"
        rate = "-" if r["success_rate"] is None else f"{100 * r['success_rate']:.1f}"
        lines.append(f"| {name} | {r['episodes']} | {rate} | {ci_text} | {failures} |")
    figure = lambda key, scale, digits: "-" if prior[key] is None else f"{scale * prior[key]:.{digits}f}"  # noqa: E731
    return [
        *lines,
        "",
        f"Recovery after a first failure {figure('recovery_rate', 100, 1)}% "
        f"({prior['episodes_with_failure']} episodes with a failure), "
        f"{figure('retries_per_episode', 1, 2)} retries per episode, cycle time "
        f"{figure('cycle_time_s', 1, 2)} s.",
    ]


def false_alarms_cell(pc: configs.PatchConfig, summaries: dict) -> str:
    """Counted only when each round's contexts are replayed without the operator (`patch.false_alarms`)."""
    if not pc.false_alarms:
        return "not measured (--patch.no-false-alarms)"
    return reporting.over_seeds([s["patch"].get("false_alarm_rate") for s in summaries.values()], True) + " %"


def markdown(config: configs.Config, summaries: dict, prior: dict) -> str:
    tc, pc, oc = config.target, config.patch, config.operator
    lines = [
        f"# Policy patching and its baselines: {tc.task}/{tc.split}, seeds {list(tc.seeds)}",
        "",
        f"Patching: {pc.rounds} rounds of {pc.envs_per_round} episodes, {pc.updates_per_round} fused SAC "
        f"steps per round. SFT arms: {pc.sft_steps} BC steps from the prior per demonstration count "
        f"{list(pc.sft_demos)}. HG-DAgger: {pc.hg_dagger_rounds} rounds of {pc.envs_per_round} episodes. "
        f"Test contexts: {tc.eval_episodes} (seed {evaluate.TEST.seed}); validation contexts: "
        f"{pc.validation_episodes} (seed {evaluate.VALIDATION.seed}); the same for every arm and round.",
        "",
        "## The prior on the test contexts",
        "",
        *prior_table(prior),
        "",
        "## Arms",
        "",
        *arm_table(summaries, pc.goal),
        "",
        "## Operator protocol (patching)",
        "",
        f"Takeovers on slip > {oc.slip}, wrist force > {oc.force} N, a failure event or {oc.stall_steps} "
        f"steps without progress{f', a {oc.lookahead}-step look-ahead' if oc.lookahead else ''}"
        f"{f', action gap > {oc.disagreement}' if oc.disagreement else ''}; control goes back after "
        f"{oc.calm_steps} calm steps, a stage advance or {oc.max_segment} steps.",
        "",
        "| measure | mean over seeds |",
        "|---|---:|",
        f"| false-alarm rate (takeovers in episodes the policy won alone) | "
        f"{false_alarms_cell(pc, summaries)} |",
        f"| median takeover segment (steps) | "
        f"{reporting.over_seeds([s['patch'].get('median_segment_steps') for s in summaries.values()])} |",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path, goal: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_keys = [
        ("takeover_steps", "operator steps"),
        ("corrective_episodes", "corrective episodes"),
        ("env_steps", "environment steps"),
    ]
    fig, axes = plt.subplots(1, len(axes_keys), figsize=(16, 4.2))
    labelled = set()  # the legend names each arm once, and only the arms this run has
    for result in results.values():
        for colour, (arm, title) in enumerate(ARMS.items()):
            records = result.get(arm) or []
            name = title if records and arm not in labelled else None
            if records:
                labelled.add(arm)
            for ax, (key, label) in zip(axes, axes_keys, strict=True):
                reporting.plot_success(ax, records, key, color=f"C{colour}", label=name)
                ax.set_xlabel(label)
    for ax in axes:
        ax.axhline(goal, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
    axes[0].set_ylabel("success on the test contexts (no operator)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"every arm against operator effort and data; {len(results)} seed(s), one line each")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEED_RESULT = "arms.json"  # a seed's finished arms, read back by a rerun


# The settings that lived in `patch` before the `target` and `operator` sections (see `upgraded`).
MOVED = {
    "target": ("prior", "task", "split", "eval_episodes"),
    "operator": tuple(field.name for field in dataclasses.fields(Trigger)),
}

# Settings added since, at the values runs saved before them ran with (see `upgraded`).
ADDED = {"patch": {"operator_share": 0.0}}


def run_settings(config: configs.Config) -> dict:
    """What a seed's results depend on: the target (all but the seed list), patch, operator and learner
    settings, the fixed contexts, and PRO's when it shapes the reward."""
    settings = {
        "target": {k: v for k, v in dataclasses.asdict(config.target).items() if k != "seeds"},
        "patch": dataclasses.asdict(config.patch),
        "operator": dataclasses.asdict(config.operator),
        "sac": dataclasses.asdict(config.sac),
        "test_seed": evaluate.TEST.seed,
        "validation_seed": evaluate.VALIDATION.seed,
    }
    if config.patch.reward == "pro":  # how PRO's reward is shaped and refreshed
        keys = ("shaping", "shaping_risk", "refresh_steps")
        settings["pro"] = {k: getattr(config.pro, k) for k in keys}
        settings["pro"]["learning_rate"] = config.pro.optimizer.learning_rate
    return settings


def upgraded(settings: dict) -> dict:
    """Settings saved by an earlier version, in today's layout. Before the `target` and `operator`
    sections their fields lived in `patch`, and operator fields that were not settings then hold their
    defaults; settings added since (`ADDED`) hold the values those runs ran with."""
    if "target" not in settings:
        patch_fields = {k: v for k, v in settings["patch"].items() if k != "seeds"}
        moved = {
            section: {k: patch_fields.pop(k) for k in names if k in patch_fields}
            for section, names in MOVED.items()
        }
        moved["operator"] = {**dataclasses.asdict(Trigger()), **moved["operator"]}
        settings = {**settings, **moved, "patch": patch_fields}
    return {**settings, **{section: {**added, **settings[section]} for section, added in ADDED.items()}}


def finished_seed(folder: pathlib.Path, settings: dict) -> dict | None:
    """A seed's arms from an earlier run of the same settings, None if it has not finished. A finished
    seed run under other settings is an error: mixing them would compare different experiments."""
    path = folder / SEED_RESULT
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    # Through JSON, so tuples and lists compare equal.
    if upgraded(saved["settings"]) != json.loads(json.dumps(settings)):
        raise SystemExit(
            f"{path} holds a seed finished under other settings; use another --out-dir or delete it"
        )
    return saved


def run_seed(
    config: configs.Config,
    prior,
    offline: list[dict],
    demos: dict,
    stress: dict,
    out: pathlib.Path,
    seed: int,
    programs: patch.Programs,
    retraining: patch.RetrainPrograms,
) -> dict:
    """Every arm of one seed: {"arms": arm -> records, "novel": arm -> the final policy's novel success}."""
    tc, pc = config.target, config.patch
    records, actor = patch.run_patching(
        config, prior, offline, out / f"seed{seed}", seed=seed, programs=programs
    )
    arms, finals = {"patch": records}, {"patch": actor}
    for arm in ("sft", "targeted_sft"):
        if arm in demos:
            arms[arm], finals[arm] = patch.run_sft(
                config, prior, demos[arm], offline, seed=seed, kind=arm, programs=retraining
            )
    if "hg_dagger" in pc.baselines:
        arms["hg_dagger"], finals["hg_dagger"] = patch.run_hg_dagger(
            config, prior, offline, seed=seed, programs=retraining
        )
    contexts = evaluate.TEST.with_episodes(tc.eval_episodes)
    novel = {
        arm: stress["patch" if arm == "patch" else "retrained"].on(params, contexts)["success_rate"]
        for arm, params in finals.items()
    }
    # PRO's other use: rank K sampled chunks of the patched policy (a whole chunk policy: "full" only).
    if pc.reward == "pro" and config.sac.actor == "full":
        patched = dataclasses.replace(prior, params=actor)
        arms["ranking"] = pro_tool.ranking_evaluations(config, patched, tc.split, seed, pro_dir=pc.pro)
    return {"arms": arms, "novel": novel}


def main(argv: list[str]) -> int:
    config = configs.cli(argv, PROG, sections=SECTIONS)
    compile_cache.enable(config.compile_cache)
    config, prior = pretrain.load_target(config, PROG)
    tc, pc = config.target, config.patch
    suffix = "-pro" if pc.reward == "pro" else ""
    out = pathlib.Path(config.out_dir) / f"patch-{tc.task}-{tc.split}{suffix}"
    offline = patch.offline_demonstrations(config)
    demos = {
        arm: patch.demonstrations(config, split, max(pc.sft_demos))
        for arm, split in (("sft", tc.split), ("targeted_sft", "tail"))
        if arm in pc.baselines
    }
    # The patched params run on the patching learner's actor (a residual on the prior by default), every
    # other arm's on the prior's chunk policy.
    stress = {
        "patch": evaluate.Evaluator(tc.task, "novel", tc.eval_episodes, patch.policy_actor(config, prior)),
        "retrained": evaluate.Evaluator(
            tc.task, "novel", tc.eval_episodes, evaluate.chunk_actor(prior.graphdef, prior.stats)
        ),
    }
    settings = run_settings(config)
    # Compiled on first use, then shared by the seeds.
    retraining = patch.RetrainPrograms.build(config, prior)
    programs = patch.Programs.build(config, prior, retrain=retraining.retrain)
    results, summaries, novel = {}, {}, {}
    for seed in tc.seeds:
        done = finished_seed(out / f"seed{seed}", settings)
        if done is None:
            done = run_seed(config, prior, offline, demos, stress, out, seed, programs, retraining)
            patch.save_json(out / f"seed{seed}" / SEED_RESULT, {"settings": settings, **done})
        else:
            print(f"seed {seed}: every arm finished in an earlier run ({out / f'seed{seed}' / SEED_RESULT})")
        results[seed], novel[seed] = done["arms"], done["novel"]
        summaries[seed] = seed_summary({k: v for k, v in done["arms"].items() if k != "ranking"}, pc.goal)
        for arm, success in novel[seed].items():
            summaries[seed][arm]["novel"] = success
        print(json.dumps({"seed": seed, **summaries[seed]}, default=str))
    prior_report = results[tc.seeds[0]]["patch"][0]
    payload = {
        "config": settings,
        "prior": prior_report,
        "seeds": results,
        "summary": summaries,
        "novel_final": novel,
    }
    patch.save_json(out / "report.json", payload)
    report = markdown(config, summaries, prior_report)
    (out / "report.md").write_text(report)
    plot(results, out / "patch.png", pc.goal)
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / 'patch.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
