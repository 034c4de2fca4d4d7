"""The report both learning-from-practice commands write (`jaxvla recap`, `jaxvla ript`).

Per seed, a method's run is a list of records, one per iteration (iteration 0: the starting policy), each
with the evaluation figures of `learner.evaluate.summarize` and the run's running totals (`env_steps`,
`wall_s`). This module turns them into `report.json`, `report.md` (mean ± std over seeds, next to the
prior and policy patching) and a plot of success against environment steps and wall-clock.
"""

import json
import pathlib

import numpy as np

# Policy patching on pick_place/novel from the same prior (`jaxvla patch default --patch.prior
# runs/long/default`, 3 seeds; docs/learner.md "Patching against full SFT retraining"): the comparison row.
PATCHING_REFERENCE = {
    "task": "pick_place",
    "split": "novel",
    "best_success": "82.3% ± 0.7",
    "final_success": "67.2% ± 9.6",
    "env_steps_to_best": "5,350 ± 810",
    "wall_s_to_best": "204 ± 12",
    "sft_best_success": "87.5% ± 5.1",
}
FIGURES = ("success_rate", "throughput_per_hour", "cycle_time_s", "retries_per_episode", "recovery_rate")


def seed_summary(records: list[dict], extra_totals: tuple[str, ...] = ()) -> dict:
    """One seed: the final and best evaluation, and what the run spent to get there."""
    final = records[-1]
    best = max(records[1:] or records, key=lambda r: r["success_rate"])
    return {
        "start_success": records[0]["success_rate"],
        **{f"final_{k}": final[k] for k in FIGURES},
        "best_success": best["success_rate"],
        "best_iteration": best["iteration"],
        "env_steps": final["env_steps"],
        "env_steps_to_best": best["env_steps"],
        "wall_s": final["wall_s"],
        **{k: final[k] for k in extra_totals},
    }


def figure(values: list, kind: str = "value") -> str:
    """mean ± std over seeds of one measure; kind: "percent" (of a fraction), "count" or "value"."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, std = float(np.mean(values)), float(np.std(values))
    if kind == "percent":
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    if kind == "count":
        return f"{mean:,.0f} ± {std:,.0f}"
    return f"{mean:.3g} ± {std:.2g}"


def markdown(
    title: str, settings: str, summaries: dict, rows: list[tuple[str, str, str]], start: dict
) -> str:
    """The table: one line per measure, mean ± std over seeds; `rows` are (label, summary key, kind)."""
    over = lambda key, kind: figure([s[key] for s in summaries.values()], kind)  # noqa: E731
    ref = PATCHING_REFERENCE
    lines = [
        f"# {title}",
        "",
        settings,
        "",
        "| measure (mean ± std over seeds) | this method | its start (iteration 0) | policy patching |",
        "|---|---:|---:|---:|",
        f"| success, final (%) | {over('final_success_rate', 'percent')} | {start['success']} | "
        f"{ref['final_success']} |",
        f"| success, best iteration (%) | {over('best_success', 'percent')} | - | {ref['best_success']} |",
        f"| throughput, final (successes / simulated hour) | {over('final_throughput_per_hour', 'count')} | "
        f"{start['throughput_per_hour']} | - |",
        f"| cycle time of the successes, final (s) | {over('final_cycle_time_s', 'value')} | "
        f"{start['cycle_time']} | - |",
        f"| environment steps, whole run | {over('env_steps', 'count')} | - | {ref['env_steps_to_best']} "
        "(to its best) |",
        f"| wall-clock, whole run, evaluations excluded (s) | {over('wall_s', 'count')} | - | "
        f"{ref['wall_s_to_best']} (to its best) |",
        *(f"| {label} | {over(key, kind)} | - | - |" for label, key, kind in rows),
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict[int, list[dict]], path: pathlib.Path, title: str) -> None:
    """Success against environment steps and wall-clock, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (seed, records) in enumerate(results.items()):
        for ax, key in zip(axes, ("env_steps", "wall_s"), strict=True):
            ax.plot([r[key] for r in records], [r["success_rate"] for r in records], "-o", ms=3,
                    color=f"C{i}", label=f"seed {seed}")  # fmt: skip
    for ax, label in zip(axes, ("environment steps", "wall-clock [s] (evaluations excluded)"), strict=True):
        ax.set_xlabel(label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(left=0)
    axes[0].set_ylabel("success on the split (evaluation)")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: pathlib.Path, name: str, title: str, settings_section: dict, settings: str, rows: list,
          results: dict, summaries: dict, plot_title: str) -> None:  # fmt: skip
    """report.json (every record, the summaries, the config section), report.md and `<name>.png`."""
    start = prior_row(results)
    payload = {"config": settings_section, "title": title, "settings": settings, "rows": rows, "start": start,
               "seeds": results, "summary": summaries, "patching_reference": PATCHING_REFERENCE}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(payload, indent=1, default=float))
    report = markdown(title, settings, summaries, rows, start)
    (out / "report.md").write_text(report)
    plot(results, out / f"{name}.png", plot_title)
    print(report)
    print(f"wrote {out / 'report.md'}, {out / 'report.json'}, {out / f'{name}.png'}")


def prior_row(records_by_seed: dict[int, list[dict]]) -> dict:
    """The starting policies' evaluation (iteration 0), mean ± std over seeds (they differ where the start
    is trained per seed, as RIPT's SFT stage is)."""
    starts = [records[0] for records in records_by_seed.values()]
    return {
        "success": figure([r["success_rate"] for r in starts], "percent"),
        "throughput_per_hour": figure([r["throughput_per_hour"] for r in starts], "count"),
        "cycle_time": figure([r["cycle_time_s"] for r in starts], "value"),
    }
