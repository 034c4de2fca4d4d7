"""`jaxvla twin --policy FILE --task T --split S --episodes N`: an exported policy in the C-MuJoCo twin.

What a robot runs, end to end without jax: `jaxvla.actor` loads and verifies the file, an
`ActionChunkBroker` executes the first `--replan` actions of each chunk before inferring again, and
`envs.twin.Twin` steps the cell. Episode i starts from seed K + i, so a run is reproducible and two
policies can be compared on the same episodes. Reports success rate, failure modes, retries, mean cycle
time of successful episodes and throughput (successes per simulated hour), as a table and optionally JSON.
"""

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

# One BLAS thread, set before numpy loads: one observation's matmuls are too small to gain from threads,
# and on a busy CPU threads waiting on each other make a 2 ms inference take 100 ms (jaxvla.actor).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from envs.tasks import TASKS  # noqa: E402
from envs.twin import Twin  # noqa: E402
from jaxvla import actor  # noqa: E402
from jaxvla import schema  # noqa: E402

PROG = "jaxvla twin"


def run_episode(twin: Twin, broker: actor.ActionChunkBroker, seed: int) -> dict:
    """One episode until done or the time limit; the outcome as the twin's telemetry reports it."""
    state = twin.reset(seed)
    broker.reset()
    policy_s, steps = 0.0, 0
    while not (state.done or state.truncated):
        t0 = time.perf_counter()
        action = broker.infer(state.obs)["actions"]
        policy_s += time.perf_counter() - t0
        state = twin.step(action)
        steps += 1
    info = state.info
    success, had_failure = bool(info["success"]), bool(info["had_failure"])
    return {
        "seed": seed,
        "success": success,
        "failure_mode": schema.FAILURE_MODES[int(info["failure_mode"])],
        "recovered": success and had_failure,
        "retries": int(info["retries"]),
        "cycle_time_s": float(info["cycle_time"]),
        "steps": steps,
        "policy_s": policy_s,
    }


def summarize(episodes: list[dict]) -> dict:
    """Success rate, failure modes, retries, cycle time and throughput over `episodes`."""
    successes = [e for e in episodes if e["success"]]
    sim_seconds = sum(e["cycle_time_s"] for e in episodes)
    steps = sum(e["steps"] for e in episodes)
    failures = collections.Counter(e["failure_mode"] for e in episodes if not e["success"])
    return {
        "episodes": len(episodes),
        "successes": len(successes),
        "success_rate": len(successes) / len(episodes),
        "recovered": sum(e["recovered"] for e in episodes),
        "failure_modes": {mode: failures[mode] for mode in schema.FAILURE_MODES if failures[mode]},
        "retries_per_episode": statistics.fmean(e["retries"] for e in episodes),
        # Cycle time is the time to a completed pick; a failed episode has none.
        "cycle_time_s": statistics.fmean(e["cycle_time_s"] for e in successes) if successes else None,
        "successes_per_sim_hour": 3600.0 * len(successes) / sim_seconds,
        "sim_seconds": sim_seconds,
        "steps": steps,
        "policy_ms_per_step": 1e3 * sum(e["policy_s"] for e in episodes) / steps,
    }


def table(summary: dict) -> str:
    cycle = summary["cycle_time_s"]
    rows = [
        ("episodes", f"{summary['episodes']}"),
        ("success rate", f"{summary['success_rate']:.1%} ({summary['successes']})"),
        ("recovered after a failure", f"{summary['recovered']}"),
        ("retries per episode", f"{summary['retries_per_episode']:.2f}"),
        ("cycle time (successes)", "-" if cycle is None else f"{cycle:.2f} s"),
        ("throughput", f"{summary['successes_per_sim_hour']:.1f} successes / simulated hour"),
        ("policy latency", f"{summary['policy_ms_per_step']:.3f} ms per control step"),
    ]
    rows += [(f"failure: {mode}", f"{n}") for mode, n in summary["failure_modes"].items()]
    width = max(len(name) for name, _ in rows)
    return "\n".join(["| metric | value |", "|---|---:|", *(f"| {n:<{width}} | {v} |" for n, v in rows)])


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--policy", type=Path, required=True, help="exported policy file (jaxvla.export)")
    p.add_argument("--task", default="pick_place", choices=list(TASKS))
    p.add_argument("--split", default="train", choices=list(schema.SPLITS))
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--seed", type=int, default=0, help="episode i starts from seed + i")
    p.add_argument(
        "--replan", type=int, default=1, help="actions executed from each chunk before re-inferring"
    )
    p.add_argument("--json", type=Path, help="write the report (summary and episodes) here")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be at least 1")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    try:
        policy = actor.load(args.policy)
    except (OSError, actor.PolicyFileError) as err:
        print(f"{PROG}: cannot run {args.policy}: {err}", file=sys.stderr)
        return 2
    if "image" in policy.inputs:
        print(f"{PROG}: {args.policy} reads camera images, which the C twin does not render", file=sys.stderr)
        return 2
    if not 1 <= args.replan <= policy.chunk:
        print(f"{PROG}: --replan must be in [1, {policy.chunk}] (the policy's chunk)", file=sys.stderr)
        return 2
    twin = Twin(args.task, args.split)
    broker = actor.ActionChunkBroker(policy, replan=args.replan)
    episodes = []
    wall = time.perf_counter()
    bar = tqdm(range(args.seed, args.seed + args.episodes), desc=f"{args.task}/{args.split}", unit="episode")
    for seed in bar:
        episodes.append(run_episode(twin, broker, seed))
        bar.set_postfix(success=f"{np.mean([e['success'] for e in episodes]):.0%}")
    wall = time.perf_counter() - wall
    summary = summarize(episodes)
    print(
        f"\npolicy v{policy.version} ({args.policy.name}) on {args.task}/{args.split}, {args.episodes} "
        f"episodes from seed {args.seed}, replan every {args.replan} step(s); wall {wall:.1f} s\n"
    )
    print(table(summary))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "policy": str(args.policy),
            "policy_version": policy.version,
            "policy_sha256": policy.metadata["sha256"],
            "args": {k: str(v) for k, v in vars(args).items()},
            "wall_s": wall,
            "summary": summary,
            "episodes": episodes,
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
