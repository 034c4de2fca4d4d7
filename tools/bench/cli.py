"""`jaxvla bench`: simulator throughput, our MJX workcell vs raw `vmap(mjx.step)`, plus the C twin.

The command line: which sections run (`--latency`, `--pretrain`, `--roofline`, `--learner`, `--updates`,
`--fleet`;
`--all` for every one and one report), in what order their tables are printed, and where the JSON and
the `--all` report are written. Each section is its own module of `tools.bench`.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

from envs.tasks import TASKS
from learner import compile_cache
from tools.bench import blocks
from tools.bench import client
from tools.bench import fleet as bench_fleet
from tools.bench import pretrain
from tools.bench import ratios
from tools.bench import replay
from tools.bench import report
from tools.bench import roofline
from tools.bench import sac
from tools.bench import sim
from tools.bench import updates as bench_updates
from tools.bench.measure import CacheEvents


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxvla bench", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 1024])
    p.add_argument("--steps", type=int, default=20, help="control steps per timed call")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions; medians are reported")
    p.add_argument("--twin-steps", type=int, default=300, help="C twin control steps per repetition")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument(
        "--all",
        action="store_true",
        help="every section (sim, latency, pretrain, learner, fleet) and one report, markdown + JSON",
    )
    p.add_argument("--report", type=Path, default=Path("runs/bench"), help="folder of the --all report")
    p.add_argument("--limit", type=float, default=600.0, help="watchdog seconds per measurement")
    p.add_argument("--no-cache", action="store_true", help="disable the persistent compilation cache")
    p.add_argument("--latency", action="store_true", help="add the policy latency section (numpy vs JAX)")
    p.add_argument("--latency-calls", type=int, default=2000, help="timed calls per policy and peer")
    p.add_argument("--no-sim", action="store_true", help="skip the MJX and C twin sections")
    p.add_argument(
        "--pretrain",
        nargs="*",
        metavar="CONFIG",
        help="add the pretraining section for these configs (default: default vla_tiny); a config may "
        "carry overrides, as in vla:batch=1024,remat=true,attention=cudnn",
    )
    p.add_argument("--pretrain-steps", type=int, default=50, help="updates per timed block")
    p.add_argument(
        "--roofline",
        metavar="CONFIG",
        help="add the roofline per op class of this transformer config's BC step (overrides as --pretrain)",
    )
    p.add_argument(
        "--learner",
        action="store_true",
        help="add the SAC learner and replay section (vs PyTorch and flashbax where installed)",
    )
    p.add_argument("--learner-steps", type=int, default=20, help="SAC train steps per timed call")
    p.add_argument("--updates", action="store_true", help="add the PRO and Recap update section")
    p.add_argument("--updates-steps", type=int, default=10, help="PRO and Recap updates per timed call")
    p.add_argument("--fleet", action="store_true", help="add the fleet section (ingest, params, jitter)")
    p.add_argument("--fleet-episodes", type=int, default=16, help="episodes pushed per concurrent actor")
    p.add_argument("--fleet-steps", type=int, default=300, help="control steps per jitter rate")
    p.add_argument(
        "--replay-capacity", type=int, default=1 << 20, help="slots of the replay add/sample buffers"
    )
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.all:
        args.no_sim, args.latency, args.learner, args.fleet, args.updates = False, True, True, True, True
        args.pretrain = args.pretrain or []
        args.json = args.json or args.report / "report.json"
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text)
        lines.append(text)

    if not args.no_cache:
        compile_cache.enable()
    cache = CacheEvents()
    info = report.machine()
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} CPUs, load {info['load_avg_1m']:.2f}; "
        f"jax {info['jax']} ({info['jax_backend']}), mujoco {info['mujoco']}, mjx {info['mujoco_mjx']}"
    )
    start = time.perf_counter()
    rows, twins, latency, trains = [], [], {}, []
    if not args.no_sim:
        for task in args.tasks:
            for batch in args.batches:
                rows.append(sim.bench_mjx(task, batch, args.steps, args.reps, args.limit, cache))
                elapsed = time.perf_counter() - start
                print(f"  {task} B={batch}: ratio {rows[-1]['ratio']:.3f} ({elapsed:.0f} s)", flush=True)
        twins = [sim.bench_twin(task, args.twin_steps, args.reps, args.limit) for task in args.tasks]
    if args.latency:
        bandwidth = client.memory_bandwidth()
        for name, config in client.LATENCY_MODELS.items():
            latency[name] = client.bench_latency(config, args.latency_calls, args.limit, bandwidth)
            print(f"  policy latency {name}: p99 ratio {latency[name]['p99_ratio']:.2f}", flush=True)
    failed = {}
    for name in args.pretrain or (["default", "vla_tiny"] if args.pretrain is not None else []):
        try:
            trains.append(pretrain.bench_pretrain(name, args.pretrain_steps, args.reps, args.limit, cache))
        except Exception as error:  # a variant the device cannot run (cuDNN attention on a CPU, say)
            failed[name] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(f"  pretrain {name}: failed: {failed[name]}", flush=True)
            continue
        print(f"  pretrain {name}: {trains[-1]['steps_per_s']:.1f} steps/s", flush=True)
    roof = {}
    if args.roofline:
        steps_per_s = next((t["steps_per_s"] for t in trains if t["config"] == args.roofline), None)
        if steps_per_s is None:
            trains.append(
                pretrain.bench_pretrain(args.roofline, args.pretrain_steps, args.reps, args.limit, cache)
            )
            steps_per_s = trains[-1]["steps_per_s"]
        roof = roofline.bench_roofline(args.roofline, 1 / steps_per_s, args.reps, args.limit)
    learner = {}
    if args.learner:
        learner = sac.bench_learner(args.learner_steps, args.reps, args.limit, cache)
        print(f"  learner: fused {learner['jax_fused']['train_steps_per_s']:.1f} train steps/s", flush=True)
        learner["replay"] = replay.bench_replay(args.replay_capacity, args.reps, args.limit, cache)
        learner["ratios"] = ratios.learner_ratios(learner, learner["replay"], args.reps)
    updates = {}
    if args.updates:
        updates = bench_updates.run(args.updates_steps, args.reps)
        print(f"  updates: PRO {updates['pro']['steps_per_s']:.2f} steps/s", flush=True)
    fleet = {}
    if args.fleet:
        fleet = bench_fleet.run(bench_fleet.fleet_policy_file(), args.fleet_episodes, args.fleet_steps)
    wall = time.perf_counter() - start
    if fleet:
        emit(
            "\nFleet on loopback: episodes of 120 steps pushed one per request, acknowledged once fsynced; "
            "default model's params file; actor loop = twin + numpy policy under RateClock\n"
        )
        emit(bench_fleet.table(fleet))
    if trains or failed:
        emit(
            f"\nBehaviour-cloning updates, {args.pretrain_steps} per jitted block, median of {args.reps}; "
            "compile = lower+compile of the block\n"
        )
        emit(pretrain.pretrain_table(trains))
    for name, error in failed.items():
        emit(f"{name}: failed: {error}")
    if roof:
        emit(roofline.heading(roof, args.reps))
        emit(roofline.roofline_table(roof))
    if not args.no_sim:
        emit(
            f"\nMJX, {args.steps} control steps per call, median of {args.reps} interleaved reps; "
            "ratio = ours/raw physics steps/s; compile = lower+compile; "
            "one untimed warm-up call each\n"
        )
        emit(sim.mjx_table(rows))
        emit(f"\nC twin, operator driving, {args.twin_steps} control steps, median of {args.reps}\n")
        emit(sim.twin_table(twins))
        emit(f"\nverified batch sizes (all calls returned): {sorted(set(args.batches))}; wall {wall:.0f} s")
    if args.latency:
        emit(
            f"\nPolicy latency, one observation (batch 1), {args.latency_calls} interleaved calls each "
            f"after {client.LATENCY_WARMUP} untimed; JAX: jitted, compile excluded, block_until_ready; "
            f"numpy: OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}\n"
        )
        emit(client.latency_table(latency))
        default = latency["state (default)"]
        ratio, p99_ms = default["numpy_p50_over_stream"], default["numpy_p99_us"] / 1e3
        bound = client.CLIENT_BOUND
        emit(
            f"\nmemory bandwidth, one thread: {default['bandwidth_gb_s']:.1f} GB/s (float32 dot of two "
            f"{client.STREAM_BYTES >> 20} MiB arrays, best of 5)"
        )
        emit(
            f"default model targets: numpy p50 <= {bound}x its weights streamed once from memory: "
            f"{default['numpy_p50_us']:.0f} us against a bound of {default['bound_us']:.0f} us = "
            f"{ratio:.2f}x the stream ({'met' if ratio <= bound else 'missed'}); p99 <= 2 ms: "
            f"{p99_ms:.3f} ms ({'met' if p99_ms <= 2 else 'missed'})"
        )
    if updates:
        emit(
            f"\nPRO and Recap updates on the data path their commands run, {args.updates_steps} per timed "
            f"call, median of {args.reps} after one untimed; default model, fake episodes\n"
        )
        emit(bench_updates.table(updates))
    if learner:
        emit(
            f"\nSAC learner, default model ({learner['params']:,} params), batch {learner['batch']}, utd "
            f"{learner['utd']}; one train step = {learner['utd']} critic updates + 1 actor update; "
            f"{args.learner_steps} train steps per timed call, median of {args.reps} interleaved reps "
            f"after one untimed; replay capacities {learner['capacities']}; device {learner['device']}; "
            f"fused matmul {learner['jax_fused']['gflops']:.1f} GFLOP/s\n"
        )
        emit(sac.learner_table(learner))
        if "draw_steps_per_s" in learner.get("draw_flashbax", {}):
            ours, theirs = learner["draw_ours"], learner["draw_flashbax"]
            emit(
                f"\nFused sample alone ({sac.DRAW_STEPS} train steps' batches per jitted call, median of "
                f"{args.reps} alternating reps): ours {ours['draw_steps_per_s']:,.0f}, flashbax "
                f"{theirs['draw_steps_per_s']:,.0f} train steps' batches/s"
            )
        r = learner["replay"]
        emit(
            f"\nReplay, capacity {r['capacity']:,} ({r['bytes'] / 2**20:.0f} MiB ours); add: "
            f"[{blocks.BLOCK_ROWS}, {blocks.BLOCK_STEPS}] blocks, median call; sample: batch {r['batch']}, "
            f"n-step {r['n_step']}, chunk {r['chunk']}, {r['sample_calls']} calls per rep, median of "
            f"{args.reps}\n"
        )
        emit(replay.replay_table(r))
        emit()
        emit(ratios.ratio_lines(learner["ratios"]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {
            "machine": info,
            "args": {k: str(v) for k, v in vars(args).items()},
            "wall_s": wall,
            "mjx": rows,
            "twin": twins,
        }
        if args.latency:
            result["latency"] = latency
        if trains:
            result["pretrain"] = trains
        if failed:
            result["pretrain_failed"] = failed
        if roof:
            result["roofline"] = roof
        if learner:
            result["learner"] = learner
        if fleet:
            result["fleet"] = fleet
        if updates:
            result["updates"] = updates
        args.json.write_text(json.dumps(result, indent=2))
    if args.all:
        args.report.mkdir(parents=True, exist_ok=True)
        title = f"# jaxvla bench: {info['cpu']}, {info['cpu_count']} CPUs"
        ratio_rows = report.ratios_table(rows, latency, learner)
        header = [
            title,
            "",
            report.machine_line(info, wall),
            "",
            "## Ratios against the peers",
            "",
            ratio_rows,
            "",
        ]
        (args.report / "report.md").write_text("\n".join(header + lines) + "\n")
        print(f"\nwrote {args.report / 'report.md'} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
