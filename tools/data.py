"""`jaxvla data generate`: scripted-operator demonstrations in the MJX workcell, written as RLDS episodes.

    jaxvla data generate --task pick_place --split train --episodes 512 [--out data] [--num-envs 64]
                         [--seed 0] [--noise 0.1] [--overwrite]

The episodes come from `envs.demos` (how they are made, with actuation noise and pushes, is in its
docstring, which `--help` shows too). The dataset goes to `<out>/<task>_<split>/` (see `jaxvla.episodes`).
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import configs
from envs import demos as operator_demos
from envs.tasks import TASKS
from jaxvla import episodes as rlds
from jaxvla import schema
from jaxvla.schema import SPLITS
from learner import compile_cache

PROG = "jaxvla data"
NOISE_HELP = "actuation noise std in action units (1 = v_max for one step); 0 turns it off"
BURSTS_HELP = "probability per step that a random push starts (0 turns pushes off)"
# `generate --help`: how the generator makes episodes, then where this command writes them.
HELP = operator_demos.__doc__.split("\n\n")[1] + "\n\n" + __doc__.split("\n\n", 2)[2]


# ------------------------------------------------------------------------------------------- command
def summarize(episodes: list[dict]) -> dict:
    """Counts over generated episodes: steps, success rate, mean length, final failure modes."""
    lengths = np.array([len(e["steps"]["reward"]) for e in episodes])
    final_modes = np.array([e["steps"]["failure_mode"][-1] for e in episodes])
    counts = np.bincount(final_modes, minlength=len(schema.FAILURE_MODES))
    return {
        "episodes": len(episodes),
        "steps": int(lengths.sum()),
        "success_rate": float(np.mean([e["episode_metadata"]["success"] for e in episodes])),
        "mean_length": float(lengths.mean()),
        "failure_modes": {name: int(n) for name, n in zip(schema.FAILURE_MODES, counts, strict=True) if n},
    }


def format_summary(summary: dict, wall_s: float) -> str:
    modes = ", ".join(f"{name} {n}" for name, n in summary["failure_modes"].items())
    rows = [
        ("episodes", str(summary["episodes"])),
        ("steps", str(summary["steps"])),
        ("success rate", f"{summary['success_rate']:.1%}"),
        ("mean length", f"{summary['mean_length']:.1f} steps"),
        ("final failure modes", modes),
        ("wall time", f"{wall_s:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _at_least(minimum, kind):
    def parse(text: str):
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="Write demonstration datasets (RLDS).")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate",
        help="scripted-operator episodes in the MJX workcell",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("--task", required=True, choices=sorted(TASKS))
    gen.add_argument("--split", required=True, choices=SPLITS)
    gen.add_argument("--episodes", required=True, type=_at_least(1, int), help="episodes to write")
    gen.add_argument("--out", default="data", help="data dir; the dataset goes to OUT/<task>_<split>/")
    gen.add_argument(
        "--num-envs",
        type=_at_least(1, int),
        default=64,
        help="envs stepped at once (64 and 128 are clear of the MJX hang in docs/mjx-on-cpu.md)",
    )
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--noise", type=_at_least(0.0, float), default=operator_demos.NOISE, help=NOISE_HELP)
    gen.add_argument("--bursts", type=_at_least(0.0, float), default=operator_demos.BURSTS, help=BURSTS_HELP)
    gen.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    compile_cache.enable()
    directory = Path(args.out) / f"{args.task}_{args.split}"
    if rlds.dataset_path(directory).exists() and not args.overwrite:
        print(
            f"{PROG}: {rlds.dataset_path(directory)} exists; pass --overwrite to replace it", file=sys.stderr
        )
        return 2
    batch = min(args.num_envs, args.episodes)
    print(
        f"{PROG}: {args.episodes} operator episodes of {args.task}/{args.split}, {batch} at a time, "
        f"actuation noise {args.noise}, pushes {args.bursts} per step"
    )
    print(f"The first batch includes the compile (10-25 s; reruns hit the cache in {configs.COMPILE_CACHE}).")
    start = time.perf_counter()
    episodes = operator_demos.generate(
        args.task,
        args.split,
        args.episodes,
        num_envs=args.num_envs,
        seed=args.seed,
        noise=args.noise,
        bursts=args.bursts,
        progress=True,
    )
    path = rlds.write_episodes(directory, episodes, overwrite=args.overwrite)
    print(format_summary(summarize(episodes), time.perf_counter() - start))
    print(f"wrote {path}")
    return 0
