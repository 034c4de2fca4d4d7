"""`jaxvla eval --policy P --task T --split S --episodes N`: a policy's figures in MJX, as a table and JSON.

P is a pretraining run folder (its latest checkpoint). `--task all` and `--split all` evaluate every task
or split; each (task, split) compiles once and runs all its episodes as one vmapped batch. The episodes
are the fixed test contexts (`--contexts validation` for the validation ones), the same every method is
scored on; a split that is a mixture (`deploy`) is broken down by component.
"""

import argparse
import dataclasses
import json
import pathlib

import configs
import envs
from envs.operator import Trigger
from jaxvla import schema
from learner import compile_cache
from learner import evaluate
from learner import patch
from learner import pretrain


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxvla eval", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, type=pathlib.Path, help="run folder with checkpoints/")
    parser.add_argument("--task", default="all", help=f"one of {', '.join(envs.TASKS)}, or 'all'")
    parser.add_argument("--split", default="all", choices=(*schema.SPLITS, "all"))
    parser.add_argument("--episodes", type=int, default=256, help="episodes per task and split")
    parser.add_argument(
        "--contexts",
        default="test",
        choices=("test", "validation"),
        help="which fixed context set to draw the episodes from",
    )
    parser.add_argument(
        "--operator",
        action="store_true",
        help="run the contexts with the scripted operator ready to take over (patching's protocol) and "
        "again without it: assisted success, effort, segments and false alarms",
    )
    parser.add_argument("--lookahead", type=int, default=0, help="with --operator: look-ahead trigger steps")
    parser.add_argument("--json", type=pathlib.Path, help="also write the report here")
    parser.add_argument(
        "--compile-cache", default=configs.COMPILE_CACHE, help="persistent compilation cache folder"
    )
    args = parser.parse_args(argv)
    if args.task != "all" and args.task not in envs.TASKS:
        parser.error(f"unknown task {args.task!r}; choose from {', '.join(envs.TASKS)} or 'all'")
    if args.episodes < 1:
        parser.error("--episodes must be at least 1")
    if not (args.policy / "checkpoints").is_dir():
        parser.error(f"{args.policy} has no checkpoints/ folder; pass a `jaxvla pretrain` run folder")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    compile_cache.enable(args.compile_cache)
    prior = pretrain.load(args.policy)
    actor = evaluate.chunk_actor(prior.graphdef, prior.stats)
    camera_res = prior.model.image_res if prior.model.image else None
    tasks = envs.TASKS if args.task == "all" else (args.task,)
    splits = schema.SPLITS if args.split == "all" else (args.split,)
    named = {"test": evaluate.TEST, "validation": evaluate.VALIDATION}
    contexts = named[args.contexts].with_episodes(args.episodes)
    if args.operator:
        return operator_protocol(args, prior, actor, tasks, splits, contexts)
    report = {}
    for task, split in ((t, s) for t in tasks for s in splits):
        evaluator = evaluate.Evaluator(task, split, args.episodes, actor, camera_res=camera_res)
        report[task, split] = evaluator.on(prior.params, contexts)
        print(f"{task}/{split}: {report[task, split]['success_rate']:.1%}", flush=True)
    print(
        f"\n{args.policy} (step {prior.step}); {contexts.episodes} {contexts.name} contexts "
        f"(seed {contexts.seed})"
    )
    print(evaluate.format_table(report))
    if args.json:
        rows = [{"task": t, "split": s, **r} for (t, s), r in report.items()]
        args.json.write_text(
            json.dumps(
                {
                    "policy": str(args.policy),
                    "step": prior.step,
                    "contexts": dataclasses.asdict(contexts),
                    "evaluation": rows,
                },
                indent=2,
            )
        )
    return 0


def operator_protocol(args, prior, actor, tasks, splits, contexts) -> int:
    """`--operator`: the takeover protocol on the fixed contexts, with and without the operator."""
    trigger = Trigger(lookahead=args.lookahead)
    rows = {}
    for task, split in ((t, s) for t in tasks for s in splits):
        collector = patch.Collector(
            task, split, args.episodes, trigger, actor, solo=True, lookahead_actor=actor
        )
        rolled = collector(prior.params, contexts.key, 0)
        rows[task, split] = patch.protocol_report(rolled, envs.get_task(task).split(split).component_names)
    print(f"\n{args.policy} (step {prior.step}); {contexts.episodes} {contexts.name} contexts, {trigger}")
    print(format_protocol(rows))
    if args.json:
        payload = [{"task": t, "split": s, **r} for (t, s), r in rows.items()]
        args.json.write_text(
            json.dumps(
                {"policy": str(args.policy), "trigger": dataclasses.asdict(trigger), "protocol": payload},
                indent=2,
            )
        )
    return 0


def format_protocol(rows: dict) -> str:
    header = (
        "task/split",
        "n",
        "assisted",
        "alone",
        "corrective",
        "segments",
        "op steps",
        "median seg",
        "false alarms",
    )
    lines = ["  ".join(f"{h:>12}" for h in header)]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for (task, split), r in rows.items():
        for name, f in [
            (f"{task}/{split}", r),
            *((f"- {k}", v) for k, v in r.get("by_component", {}).items()),
        ]:
            median = "-" if f["median_segment_steps"] is None else f"{f['median_segment_steps']:.0f}"
            cells = (
                name,
                f["episodes"],
                pct(f["assisted_success"]),
                pct(f["solo_success"]),
                f["corrective_episodes"],
                f["takeover_segments"],
                f["takeover_steps"],
                median,
                pct(f["false_alarm_rate"]),
            )
            lines.append("  ".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)
