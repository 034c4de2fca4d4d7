"""Report helpers of the commands: what a run reached and when, figures over seeds, and the report both
learning-from-practice commands write (`jaxvla recap`, `jaxvla ript`).

Per seed, a method's run is a list of records, one per iteration (iteration 0: the starting policy), each
with the evaluation figures of `learner.evaluate.summarize` on the fixed test contexts (`evaluate.TEST`)
and the run's running totals (`env_steps`, `wall_s`). This module turns them into `report.json`,
`report.md` and a plot of success against environment steps and wall-clock.

Every figure is on the fixed test contexts, so the start and every iteration are paired. A run is reported
by its final evaluation and the mean of its last 3 (never its best: the maximum of noisy evaluations is
biased upwards), with a 95% Wilson interval per seed and a bootstrap interval of the mean over seeds; the
final policy's success on `novel` is the stress column.
"""

import json
import pathlib

import numpy as np

from learner import evaluate


def first_reaching(records: list[dict], target: float, key: str = "success_rate") -> dict | None:
    """The first record whose `key` is at least `target`."""
    return next((r for r in records if r[key] is not None and r[key] >= target), None)


# How a measure of each kind is written: (format of one number, scale).
FORMATS = {"percent": ("{:.1f}", 100), "count": ("{:,.0f}", 1), "value": ("{:.3g}", 1)}


def mean_interval(values: list, fmt: str = "{:.3g}", scale: float = 1) -> str:
    """The mean of `values` (one per seed, at least one) in `fmt`, with its bootstrap 95% interval when
    there are two or more."""
    text = fmt.format(scale * np.mean(values))
    if len(values) > 1:
        lo, hi = evaluate.bootstrap_interval(values)
        text += f" [{fmt.format(scale * lo)}, {fmt.format(scale * hi)}]"
    return text


def over_seeds(values: list, percent: bool = False, count: bool = False) -> str:
    """Mean over seeds with a bootstrap 95% interval, and how many seeds got there when not all did."""
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    text = mean_interval(reached, *FORMATS["percent" if percent else "count" if count else "value"])
    return text + (f" ({len(reached)}/{len(values)} seeds)" if len(reached) < len(values) else "")


def plot_success(ax, records: list[dict], key: str, **style) -> None:
    """One run's success against `key` (operator steps, environment steps, ...) on `ax`."""
    ax.plot([r[key] for r in records], [r["success_rate"] for r in records], "-o", ms=3, alpha=0.7, **style)


FIGURES = ("success_rate", "throughput_per_hour", "cycle_time_s", "retries_per_episode", "recovery_rate")


def seed_summary(records: list[dict], extra_totals: tuple[str, ...] = ()) -> dict:
    """One seed: its start, final and last-3 evaluations, per-component failures and what it spent."""
    final = records[-1]
    head = evaluate.headline(records)
    return {
        "start_success": records[0]["success_rate"],
        "start_ci": records[0]["success_ci"],
        **{f"start_{k}": records[0][k] for k in FIGURES if k != "success_rate"},
        **{f"final_{k}": final[k] for k in FIGURES},
        "final_ci": head["final_ci"],
        "last3_success": head["last3_mean"],
        "gain": final["success_rate"] - records[0]["success_rate"],
        "start_failures": component_failures(records[0]),
        "final_failures": component_failures(final),
        "env_steps": final["env_steps"],
        "wall_s": final["wall_s"],
        **{k: final[k] for k in extra_totals},
    }


def component_failures(record: dict) -> dict[str, int]:
    """Failed episodes per mixture component of one evaluation ({} for a one-component split)."""
    return {name: c["failures"] for name, c in record.get("by_component", {}).items()}


def figure(values: list, kind: str = "value") -> str:
    """mean [95% bootstrap interval over seeds] of one measure; kind: "percent" (of a fraction), "count",
    "ratio" or "value"."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return mean_interval(values, *FORMATS.get(kind, FORMATS["value"]))


def wilson(ci) -> str:
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def markdown(
    title: str,
    settings: str,
    summaries: dict,
    rows: list[tuple[str, str, str]],
    columns: list[tuple[str, str, str]],
    results: dict,
) -> str:
    """The headline table (mean [bootstrap 95%] over seeds), each seed's own line with Wilson intervals, and
    the iterations (mean over seeds). `rows` (label, summary key, kind) add lines to the headline table,
    `columns` (label, record key, kind) columns to the per-iteration one."""
    over = lambda key, kind: figure([s.get(key) for s in summaries.values()], kind)  # noqa: E731
    ratio = [
        s["final_throughput_per_hour"] / s["start_throughput_per_hour"]
        for s in summaries.values()
        if s["start_throughput_per_hour"]
    ]
    lines = [
        f"# {title}",
        "",
        settings,
        "",
        f"All figures on the fixed test contexts (`{evaluate.TEST.name}`, seed {evaluate.TEST.seed}); "
        "mean over seeds with a 95% bootstrap interval over seeds.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| success, start (%) | {over('start_success', 'percent')} |",
        f"| success, final (%) | {over('final_success_rate', 'percent')} |",
        f"| success, mean of the last 3 evaluations (%) | {over('last3_success', 'percent')} |",
        f"| gain, final - start (points) | {over('gain', 'percent')} |",
        f"| throughput, start (successes / simulated hour) | {over('start_throughput_per_hour', 'count')} |",
        f"| throughput, final | {over('final_throughput_per_hour', 'count')} |",
        f"| throughput, final / start | {figure(ratio, 'value')} |",
        f"| success on `novel`, final policy (%) | {over('novel_success', 'percent')} |",
        f"| environment steps, whole run | {over('env_steps', 'count')} |",
        f"| wall-clock, whole run, evaluations excluded (s) | {over('wall_s', 'count')} |",
        *(f"| {label} | {over(key, kind)} |" for label, key, kind in rows),
        "",
        "| seed | start (95% Wilson) | final (95% Wilson) | last 3 | novel | failures per component, "
        "start -> final |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for seed, s in summaries.items():
        novel = f"{100 * s['novel_success']:.1f}" if s.get("novel_success") is not None else "-"
        failures = ", ".join(f"{k} {s['start_failures'][k]} -> {v}" for k, v in s["final_failures"].items())
        lines.append(
            f"| {seed} | {100 * s['start_success']:.1f} {wilson(s['start_ci'])} | "
            f"{100 * s['final_success_rate']:.1f} {wilson(s['final_ci'])} | {100 * s['last3_success']:.1f} | "
            f"{novel} | {failures or '-'} |"
        )
    lines += [
        "",
        "| iteration | success (%) | " + " | ".join(c[0] for c in columns) + " |",
        "|---:|---:|" + "---:|" * len(columns),
    ]
    for i in range(max(len(r) for r in results.values())):
        at = [r[i] for r in results.values() if len(r) > i]
        cells = [figure([r["success_rate"] for r in at], "percent")]
        cells += [figure([r.get(key) for r in at], kind) for _, key, kind in columns]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict[int, list[dict]], path: pathlib.Path, title: str) -> None:
    """Success on the test contexts against environment steps and wall-clock, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (seed, records) in enumerate(results.items()):
        for ax, key in zip(axes, ("env_steps", "wall_s"), strict=True):
            ax.plot(
                [r[key] for r in records],
                [r["success_rate"] for r in records],
                "-o",
                ms=3,
                color=f"C{i}",
                label=f"seed {seed}",
            )
    for ax, label in zip(axes, ("environment steps", "wall-clock [s] (evaluations excluded)"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(left=0)
    axes[0].set_ylabel("success on the fixed test contexts")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(
    out: pathlib.Path,
    name: str,
    title: str,
    settings_section: dict,
    settings: str,
    rows: list,
    columns: list,
    results: dict,
    summaries: dict,
    plot_title: str,
    extra: dict | None = None,
) -> str:
    """report.json (every record, the summaries, the config section, `extra`), report.md and `<name>.png`;
    returns the markdown."""
    payload = {
        "config": settings_section,
        "title": title,
        "settings": settings,
        "rows": rows,
        "contexts": {"name": evaluate.TEST.name, "seed": evaluate.TEST.seed},
        "seeds": results,
        "summary": summaries,
        **(extra or {}),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=float))
    report = markdown(title, settings, summaries, rows, columns, results)
    (out / "report.md").write_text(report)
    plot(results, out / f"{name}.png", plot_title)
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / f'{name}.png'}")
    return report
