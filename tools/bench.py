"""`jaxvla bench`: simulator throughput, our MJX workcell vs raw `vmap(mjx.step)`, plus the C twin.

Protocol (shared/research/performance.md, row B3): compile time is timed apart from steady state
(explicit `lower().compile()`), every timer stops after `block_until_ready`, ours and raw repetitions are
interleaved, and the reported figure is the median over repetitions. Every measurement runs under a
watchdog because a jitted MJX step on this CPU has stopped returning before (shared/notes/mjx-on-cpu.md).
"""

import argparse
import contextlib
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import mujoco
import numpy as np
from mujoco import mjx

from envs.tasks import TASKS
from envs.twin import Twin
from envs.workcell import Workcell

CACHE_DIR = ".cache/jax"


# ------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def watchdog(label: str, seconds: float):
    """Exits the process (code 124) if the block runs longer than `seconds`, saying what was running.

    A thread timer rather than `signal.alarm`: Python signal handlers cannot run while the main thread
    is blocked inside XLA, but another thread can, because blocking waits release the GIL.
    """

    def fire():
        print(f"\nbench: watchdog: {label!r} ran past {seconds:.0f} s; exiting", file=sys.stderr, flush=True)
        os._exit(124)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


class CacheEvents:
    """Counts persistent-compilation-cache hits, so a compile time that was really a load is labelled."""

    def __init__(self):
        self.hits = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_):
        if event == "/jax/compilation_cache/cache_hits":
            self.hits += 1


def compile_timed(fn, *args, cache: CacheEvents) -> tuple:
    """Returns (compiled executable, seconds to lower and compile, whether the cache served it)."""
    hits = cache.hits
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0, cache.hits > hits


def call_timed(compiled, *args) -> float:
    """Seconds for one call, including `block_until_ready` on its outputs."""
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------- programs
def ours_program(env: Workcell, steps: int):
    """`steps` control steps of the batched env in one scan, with a constant action (no policy cost)."""
    action = jnp.zeros(env.action_size, jnp.float32)  # no motion, suction off
    step = jax.vmap(env.step, in_axes=(0, None))

    def run(states):
        return jax.lax.scan(lambda s, _: (step(s, action), None), states, None, length=steps)[0]

    return run


def raw_program(env: Workcell, physics_steps: int):
    """The peer: `physics_steps` of raw `vmap(mjx.step)` on the same models, ctrl held as given.

    "The same model" is each env's episode model (its item's mass, size and friction): stepping the
    compiled base model instead would simulate a different scene (the largest item, other contacts).
    """
    step = jax.vmap(mjx.step)

    def run(states):
        models = jax.vmap(env.episode_model)(states.params)  # built once, outside the timed steps' loop
        body = lambda d, _: (step(models, d), None)  # noqa: E731
        return jax.lax.scan(body, states.data, None, length=physics_steps)[0]

    return run


# ------------------------------------------------------------------------------------ measurements
def bench_mjx(task: str, batch: int, steps: int, reps: int, limit: float, cache: CacheEvents) -> dict:
    """Ours vs raw for one task and batch size; repetitions interleaved, medians reported."""
    env = Workcell(task, "train")
    substeps = env.config.substeps
    with watchdog(f"{task} B={batch} reset", limit):
        keys = jax.random.split(jax.random.key(0), batch)
        states = jax.block_until_ready(jax.jit(jax.vmap(env.reset))(keys))
    with watchdog(f"{task} B={batch} ours compile", limit):
        ours, ours_compile, ours_hit = compile_timed(ours_program(env, steps), states, cache=cache)
    with watchdog(f"{task} B={batch} raw compile", limit):
        raw_fn = raw_program(env, steps * substeps)
        raw, raw_compile, raw_hit = compile_timed(raw_fn, states, cache=cache)
    # The first call of a fresh executable is slower (allocation, thread-pool start): record it, apart.
    with watchdog(f"{task} B={batch} first calls", limit):
        first = {"ours": call_timed(ours, states), "raw": call_timed(raw, states)}
    ours_s, raw_s = [], []
    for rep in range(reps):
        with watchdog(f"{task} B={batch} ours rep {rep}", limit):
            ours_s.append(call_timed(ours, states))
        with watchdog(f"{task} B={batch} raw rep {rep}", limit):
            raw_s.append(call_timed(raw, states))
    physics = batch * steps * substeps
    ours_pps, raw_pps = physics / statistics.median(ours_s), physics / statistics.median(raw_s)
    return {
        "task": task,
        "batch": batch,
        "steps": steps,
        "substeps": substeps,
        "ours_ctrl_per_s": ours_pps / substeps,
        "ours_physics_per_s": ours_pps,
        "raw_physics_per_s": raw_pps,
        "ratio": ours_pps / raw_pps,
        "ours_compile_s": ours_compile,
        "raw_compile_s": raw_compile,
        "ours_compile_cache_hit": ours_hit,
        "raw_compile_cache_hit": raw_hit,
        "first_call_s": first,
        "ours_call_s": ours_s,
        "raw_call_s": raw_s,
    }


def bench_twin(task: str, steps: int, reps: int, limit: float) -> dict:
    """The C twin driven by the operator (control steps/s), and raw `mj_step` on its model (physics/s)."""
    twin = Twin(task, "train")
    substeps = twin.config.substeps
    ctrl_s, raw_s = [], []
    for rep in range(reps):
        with watchdog(f"{task} twin rep {rep}", limit):
            twin.reset(seed=rep)
            t0 = time.perf_counter()
            for _ in range(steps):
                state = twin.step(twin.operator_action())
                if state.done or state.truncated:
                    twin.reset()
            ctrl_s.append(time.perf_counter() - t0)
            twin.reset(seed=rep)
            t0 = time.perf_counter()
            for _ in range(steps * substeps):
                mujoco.mj_step(twin.model, twin.data)
            raw_s.append(time.perf_counter() - t0)
    ctrl = steps / statistics.median(ctrl_s)
    return {
        "task": task,
        "steps": steps,
        "substeps": substeps,
        "twin_ctrl_per_s": ctrl,
        "twin_physics_per_s": ctrl * substeps,
        "mj_step_physics_per_s": steps * substeps / statistics.median(raw_s),
    }


# ----------------------------------------------------------------------------------------- reports
def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],  # another engineer's jobs share these cores
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "mujoco": mujoco.__version__,
        "mujoco_mjx": importlib.metadata.version("mujoco-mjx"),
        "numpy": np.__version__,
    }


def mjx_table(rows: list[dict]) -> str:
    head = (
        "| task | batch | ours ctrl/s | ours physics/s | raw physics/s | ratio "
        "| ours compile s | raw compile s |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['batch']} | {r['ours_ctrl_per_s']:,.0f} | {r['ours_physics_per_s']:,.0f} "
            f"| {r['raw_physics_per_s']:,.0f} | {r['ratio']:.3f} "
            f"| {_compile(r, 'ours')} | {_compile(r, 'raw')} |"
        )
    return "\n".join(lines)


def _compile(row: dict, who: str) -> str:
    return f"{row[f'{who}_compile_s']:.1f}" + (" (cache)" if row[f"{who}_compile_cache_hit"] else "")


def twin_table(rows: list[dict]) -> str:
    lines = ["| task | twin ctrl/s | twin physics/s | mj_step physics/s |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['twin_ctrl_per_s']:,.0f} | {r['twin_physics_per_s']:,.0f} | "
            f"{r['mj_step_physics_per_s']:,.0f} |"
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- main
def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jaxvla bench", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 64, 1024])
    p.add_argument("--steps", type=int, default=20, help="control steps per timed call")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions; medians are reported")
    p.add_argument("--twin-steps", type=int, default=300, help="C twin control steps per repetition")
    p.add_argument("--json", type=Path, help="write the results here as JSON")
    p.add_argument("--limit", type=float, default=600.0, help="watchdog seconds per measurement")
    p.add_argument("--no-cache", action="store_true", help="disable the persistent compilation cache")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if not args.no_cache:
        jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
    cache = CacheEvents()
    info = machine()
    print(
        f"machine: {info['cpu']}, {info['cpu_count']} CPUs, load {info['load_avg_1m']:.2f}; "
        f"jax {info['jax']} ({info['jax_backend']}), mujoco {info['mujoco']}, mjx {info['mujoco_mjx']}"
    )
    start = time.perf_counter()
    rows = []
    for task in args.tasks:
        for batch in args.batches:
            rows.append(bench_mjx(task, batch, args.steps, args.reps, args.limit, cache))
            elapsed = time.perf_counter() - start
            print(f"  {task} B={batch}: ratio {rows[-1]['ratio']:.3f} ({elapsed:.0f} s)", flush=True)
    twins = [bench_twin(task, args.twin_steps, args.reps, args.limit) for task in args.tasks]
    wall = time.perf_counter() - start
    print(f"\nMJX, {args.steps} control steps per call, median of {args.reps} interleaved reps; "
          "ratio = ours/raw physics steps/s; compile = lower+compile; "
        "one untimed warm-up call each\n")  # fmt: skip
    print(mjx_table(rows))
    print(f"\nC twin, operator driving, {args.twin_steps} control steps, median of {args.reps}\n")
    print(twin_table(twins))
    print(f"\nverified batch sizes (all calls returned): {sorted(set(args.batches))}; wall {wall:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall,
                  "mjx": rows, "twin": twins}  # fmt: skip
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
