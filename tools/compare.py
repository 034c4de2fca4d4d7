"""`jaxvla compare`: patching runs side by side, on the same axes, with every seed.

    jaxvla compare sparse=runs/a/patch-pick_place-deploy shaped=runs/b/patch-pick_place-deploy-pro \
        [--arm patch] [--goal 0.9] [--out runs/compare]

Each LABEL=FOLDER is a `jaxvla patch` output folder (its report.json). The runs must share the fixed test
and validation contexts, the task, split and evaluation sizes, or the comparison is refused: their
numbers would not be paired. Their seeds may differ (each row says which it has). Writes compare.md (one
row per run: mean over seeds [bootstrap 95% interval], every seed's final success, and every later run
paired by seed with the first) and compare.png (test and validation success against environment and
operator steps, one thin line per seed, the mean over seeds thick).
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from tools import reporting
from tools.patch import arm_summary
from tools.patch import upgraded

# What must be equal for two runs' figures to be paired: (settings section, field).
PAIRED = (
    ("target", "task"),
    ("target", "split"),
    ("target", "eval_episodes"),
    ("patch", "validation_episodes"),
)

# (heading, summary key, kind): "percent" and "count" are means over seeds; "reached" is an effort to the
# goal, which some seeds may not reach.
COLUMNS = (
    ("final success (%)", "final", "percent"),
    ("last-3 mean (%)", "last3_mean", "percent"),
    ("train component (%)", "train_component", "percent"),
    ("novel, final (%)", "novel", "percent"),
    ("recovery after a failure (%)", "final_recovery_rate", "percent"),
    ("retries per episode", "final_retries_per_episode", "value"),
    ("cycle time (s)", "final_cycle_time_s", "value"),
    ("operator steps, all rounds", "takeover_steps", "count"),
    ("env steps, all rounds", "env_steps", "count"),
    ("env steps to goal", "env_steps_to_goal", "reached"),
    ("operator steps to goal", "takeover_steps_to_goal", "reached"),
)


# Paired by seed with the first run, over the seeds both have: (heading, summary key, kind). "points",
# "difference" and "count" are the later run minus the first; "ratio" is the later run's effort to the goal
# over the first's, over the seeds where both reached it.
PAIRED_COLUMNS = (
    ("final success (points)", "final", "points"),
    ("last-3 mean (points)", "last3_mean", "points"),
    ("train component (points)", "train_component", "points"),
    ("recovery after a failure (points)", "final_recovery_rate", "points"),
    ("retries per episode", "final_retries_per_episode", "difference"),
    ("operator steps, all rounds", "takeover_steps", "count"),
    ("env steps to goal (ratio)", "env_steps_to_goal", "ratio"),
    ("operator steps to goal (ratio)", "takeover_steps_to_goal", "ratio"),
)


def cell(values: list, kind: str) -> str:
    if kind == "reached":
        return reporting.over_seeds(values, count=True)
    return reporting.figure(values, kind)


def parse_runs(specs: list[str]) -> dict[str, pathlib.Path]:
    runs = {}
    for spec in specs:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            raise SystemExit(f"jaxvla compare: expected LABEL=FOLDER, got {spec!r}")
        path = pathlib.Path(folder) / "report.json"
        if not path.exists():
            raise SystemExit(f"jaxvla compare: {path} does not exist (run `jaxvla patch` there first)")
        runs[label] = path.parent
    return runs


def pairing_key(report: dict) -> dict:
    config = upgraded(report["config"])  # reports written before the target section too
    return {
        **{field: config[section][field] for section, field in PAIRED},
        "test_seed": config["test_seed"],
        "validation_seed": config["validation_seed"],
    }


def check_paired(reports: dict[str, dict]) -> None:
    """Refuses runs whose figures are not on the same contexts, naming what differs."""
    keys = {label: pairing_key(r) for label, r in reports.items()}
    first_label, first = next(iter(keys.items()))
    for label, key in keys.items():
        differs = [k for k in first if key[k] != first[k]]
        if differs:
            detail = ", ".join(f"{k}: {first[k]} vs {key[k]}" for k in differs)
            raise SystemExit(f"jaxvla compare: {label} is not paired with {first_label} ({detail})")


def run_summaries(report: dict, arm: str, goal: float) -> dict[str, dict]:
    """Seed -> the summary of `arm`: its headline, effort to the goal and totals over all rounds."""
    out = {}
    for seed, arms in sorted(report["seeds"].items()):
        records = arms.get(arm)
        if not records:
            raise SystemExit(f"jaxvla compare: seed {seed} has no {arm!r} arm")
        summary = arm_summary(records, goal)
        summary["takeover_steps"] = records[-1]["takeover_steps"]
        summary["env_steps"] = records[-1]["env_steps"]
        summary["novel"] = report.get("novel_final", {}).get(seed, {}).get(arm)
        out[seed] = summary
    return out


def paired_values(first: dict[str, dict], other: dict[str, dict], key: str, kind: str) -> list:
    """Per seed both runs have, `other` against `first` on one measure (None where a run has no value or,
    for a ratio, did not reach the goal)."""
    values = []
    for seed in sorted(first.keys() & other.keys()):
        a, b = first[seed].get(key), other[seed].get(key)
        if a is None or b is None:
            values.append(None)
        else:
            values.append(b / a if kind == "ratio" else b - a)
    return values


def paired_cell(values: list, kind: str) -> str:
    """Mean [bootstrap 95% interval] of paired differences or ratios, with how many seeds had both."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    fmt = {"points": "{:+.1f}", "difference": "{:+.2f}", "count": "{:+,.0f}", "ratio": "{:.2f}"}[kind]
    text = reporting.mean_interval(present, fmt, 100 if kind == "points" else 1)
    return text + (f" ({len(present)}/{len(values)} seeds)" if len(present) < len(values) else "")


def paired_table(summaries: dict[str, dict[str, dict]]) -> list[str]:
    """Every later run against the first, seed by seed: the comparison the paired protocol is for."""
    (first_label, first), *others = summaries.items()
    if not others:
        return []
    lines = [
        f"Paired by seed with {first_label}: mean over the seeds both runs have [bootstrap 95% interval].",
        "",
        "| run | seeds | " + " | ".join(name for name, _, _ in PAIRED_COLUMNS) + " |",
        "|---|---:|" + "---:|" * len(PAIRED_COLUMNS),
    ]
    for label, per_seed in others:
        shared = len(first.keys() & per_seed.keys())
        cells = [paired_cell(paired_values(first, per_seed, k, kind), kind) for _, k, kind in PAIRED_COLUMNS]
        lines.append(f"| {label} | {shared} | " + " | ".join(cells) + " |")
    return ["", *lines]


def markdown(
    summaries: dict[str, dict[str, dict]], reports: dict[str, dict], folders: dict, arm: str, goal: float
) -> str:
    key = pairing_key(next(iter(reports.values())))
    lines = [
        f"# Patching runs compared: {key['task']}/{key['split']}, arm {arm!r}",
        "",
        f"Test contexts: {key['eval_episodes']} (seed {key['test_seed']}); validation contexts: "
        f"{key['validation_episodes']} (seed {key['validation_seed']}); goal {goal:.0%} on validation. "
        "Mean over seeds [bootstrap 95% interval].",
        "",
        "| run | " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for label, per_seed in summaries.items():
        cells = [cell([s.get(k) for s in per_seed.values()], kind) for _, k, kind in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "| run | seeds | final success per seed (%) | folder |", "|---|---|---|---|"]
    for label, per_seed in summaries.items():
        finals = " / ".join(f"{100 * s['final']:.1f}" for s in per_seed.values())
        lines.append(f"| {label} | {', '.join(per_seed)} | {finals} | `{folders[label]}` |")
    lines += paired_table(summaries)
    return "\n".join(lines) + "\n"


def plot(reports: dict[str, dict], arm: str, goal: float, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("env_steps", "success_rate", "environment steps", "test success"),
        ("env_steps", "validation_success", "environment steps", "validation success"),
        ("takeover_steps", "success_rate", "operator steps", "test success"),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4.2))
    for colour, (label, report) in enumerate(reports.items()):
        runs = [arms[arm] for _, arms in sorted(report["seeds"].items())]
        for ax, (x, y, xlabel, ylabel) in zip(axes, panels, strict=True):
            for records in runs:
                xs, ys = [r[x] for r in records], [r[y] for r in records]
                ax.plot(xs, ys, color=f"C{colour}", lw=0.8, alpha=0.4)
            rounds = min(len(r) for r in runs)
            mean_x = np.mean([[r[x] for r in records[:rounds]] for records in runs], axis=0)
            mean_y = np.mean([[r[y] for r in records[:rounds]] for records in runs], axis=0)
            ax.plot(mean_x, mean_y, "-o", ms=3, color=f"C{colour}", lw=2, label=label)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
    for ax in axes:
        ax.axhline(goal, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{arm!r} arm of each run: thin lines one seed each, thick the mean over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="jaxvla compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=FOLDER", help="a `jaxvla patch` output folder")
    parser.add_argument("--arm", default="patch", help="arm of each run to compare (default: patch)")
    parser.add_argument("--goal", type=float, default=0.9, help="validation success of 'to goal'")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/compare"))
    args = parser.parse_args(argv)
    folders = parse_runs(args.runs)
    reports = {label: json.loads((folder / "report.json").read_text()) for label, folder in folders.items()}
    check_paired(reports)
    summaries = {label: run_summaries(r, args.arm, args.goal) for label, r in reports.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(summaries, reports, folders, args.arm, args.goal)
    (args.out / "compare.md").write_text(text)
    plot(reports, args.arm, args.goal, args.out / "compare.png")
    print(text)
    print(f"wrote {args.out / 'compare.md'} and {args.out / 'compare.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
