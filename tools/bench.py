"""`jaxvla bench`: simulator throughput, our MJX workcell vs raw `vmap(mjx.step)`, plus the C twin.

With `--latency`, also the robot-side policy latency: the numpy actor vs the jitted JAX forward pass
(`--no-sim` runs that section alone).

Protocol (shared/research/performance.md, row B3): compile time is timed apart from steady state
(explicit `lower().compile()`), every timer stops after `block_until_ready`, ours and raw repetitions are
interleaved, and the reported figure is the median over repetitions. Every measurement runs under a
watchdog because a jitted MJX step on this CPU has stopped returning before (shared/notes/mjx-on-cpu.md).
"""

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

# The numpy actor is timed as robots should run it, with one BLAS thread (see jaxvla.actor); this must be
# set before numpy loads. The other sections do not use numpy's BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import mujoco  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from mujoco import mjx  # noqa: E402

import configs  # noqa: E402
from envs.tasks import TASKS  # noqa: E402
from envs.twin import Twin  # noqa: E402
from envs.workcell import Workcell  # noqa: E402
from jaxvla import actor  # noqa: E402
from jaxvla import export  # noqa: E402
from jaxvla import models  # noqa: E402
from jaxvla import normalization  # noqa: E402
from learner import bc  # noqa: E402
from learner import sharding  # noqa: E402

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


# Models timed by the policy latency section: the default (the targets apply to it) and the VLA-scale one.
LATENCY_MODELS = {
    "state (default)": models.ModelConfig(),
    "transformer + image": models.ModelConfig(encoder="transformer", image=True),
}
LATENCY_WARMUP = 200


def bench_latency(config: models.ModelConfig, calls: int, limit: float) -> dict:
    """Batch-1 policy latency: the numpy actor's `infer` vs the jitted JAX forward pass, interleaved.

    Both do the same work on one observation held in numpy (as a robot has it): normalise, run the
    network, tanh. JAX gets params already on the device, its compile timed apart, every call ended by
    `block_until_ready`; the actor runs the exported file, loaded once. p50/p99 over `calls` calls each,
    after LATENCY_WARMUP untimed calls.
    """
    graphdef, params = nnx.split(config.create_policy(0), nnx.Param)
    obs = jax.device_get(config.fake_observation(jax.random.key(0), 256))
    stats = normalization.compute(obs)
    one = {k: v[:1] for k, v in obs.items()}
    with tempfile.TemporaryDirectory() as directory:
        path = export.write(directory, config, params, stats, version=0, parent_version=None, config_hash="")
        policy = actor.load(path)
    single = {k: v[0] for k, v in one.items()}

    def forward(p, o):
        return jnp.tanh(models.apply(graphdef, p, normalization.normalize(o, stats))[0])

    with watchdog("policy latency: jax compile", limit):
        t0 = time.perf_counter()
        compiled = jax.jit(forward).lower(params, one).compile()
        compile_s = time.perf_counter() - t0
    jax_call = lambda: jax.block_until_ready(compiled(params, one))  # noqa: E731
    numpy_call = lambda: policy.infer(single)  # noqa: E731
    with watchdog("policy latency: calls", limit):
        for _ in range(LATENCY_WARMUP):
            jax_call(), numpy_call()
        times = {"numpy": [], "jax": []}
        for _ in range(calls):
            for name, call in (("numpy", numpy_call), ("jax", jax_call)):
                t0 = time.perf_counter_ns()
                call()
                times[name].append(time.perf_counter_ns() - t0)
    row = {"calls": calls, "jax_compile_s": compile_s, "onnxruntime": onnxruntime_status()}
    for name, ns in times.items():
        us = np.asarray(ns) / 1e3
        row[f"{name}_p50_us"], row[f"{name}_p99_us"] = (
            float(np.percentile(us, 50)),
            float(np.percentile(us, 99)),
        )
    row["p99_ratio"] = row["numpy_p99_us"] / row["jax_p99_us"]
    return row


def bench_pretrain(name: str, steps: int, reps: int, limit: float, cache: CacheEvents) -> dict:
    """Behaviour-cloning updates per second for the named config's model and batch, on all local devices.

    One jitted block of `steps` updates (as `jaxvla pretrain` runs them) on a random dataset of 4096
    examples; compile timed apart; the median of `reps` blocks. FLOPs per step are the block's matmul FLOPs
    counted from its jaxpr, so model FLOPs utilisation can be worked out against a device's peak.
    """
    config = configs.get_config(name)
    mc, pc = config.model, config.pretrain
    mesh = sharding.make_mesh()
    batch = pc.batch_size - pc.batch_size % mesh.size
    key_obs, key_chunk = jax.random.split(jax.random.key(0))
    data = {
        "obs": mc.fake_observation(key_obs, 4096),
        "chunk": mc.fake_chunk(key_chunk, 4096),
        "mask": jnp.ones((4096, mc.chunk), bool),
    }
    stats = normalization.compute(jax.device_get(data["obs"]))
    graphdef, params = nnx.split(mc.create_policy(0), nnx.Param)
    optimizer = bc.make_optimizer(pc.learning_rate, 1000, 10, pc.weight_decay)
    train = bc.make_train_steps(graphdef, stats, optimizer, num_steps=steps, batch_size=batch,
                                nll_weight=pc.nll_weight, mesh=mesh)  # fmt: skip
    state = jax.device_put(bc.init_state(params, optimizer), sharding.replicated(mesh))
    data = jax.device_put(data, sharding.replicated(mesh))
    key = jax.random.key(1)
    with watchdog(f"pretrain {name}: compile", limit):
        hits = cache.hits
        t0 = time.perf_counter()
        traced = train.trace(state, data, key)
        compiled = traced.lower().compile()
        compile_s, cached = time.perf_counter() - t0, cache.hits > hits
    flops_per_step = matmul_flops(traced.jaxpr) / steps
    times = []
    with watchdog(f"pretrain {name}: steps", limit):
        state, _ = compiled(state, data, key)  # warm-up (and the state is donated: keep the new one)
        for _ in range(reps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, data, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {
        "config": name, "params": models.count_params(nnx.merge(graphdef, params)), "batch": batch,
        "devices": mesh.size, "steps_per_call": steps, "steps_per_s": steps / seconds,
        "examples_per_s": steps * batch / seconds, "compile_s": compile_s, "compile_cached": cached,
        "flops_per_step": flops_per_step, "achieved_tflops": flops_per_step * steps / seconds / 1e12,
        "mfu": mfu(flops_per_step * steps / seconds, mc.dtype),
    }  # fmt: skip


def matmul_flops(closed_jaxpr) -> float:
    """Matmul and convolution FLOPs of a jaxpr, loop bodies multiplied by their trip count.

    Counted from the program rather than from XLA's cost analysis, which is backend-dependent: on GPU the
    matmuls become cuBLAS custom calls that the compiled module's analysis does not count.
    """
    total = 0.0
    for eqn in closed_jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)
        elif eqn.primitive.name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape  # kernel: out features, in features / groups, spatial...
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs[1:])
        trips = eqn.params.get("length", 1)  # scan; while loops have no static trip count and count once
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += trips * matmul_flops(sub if hasattr(sub, "jaxpr") else jax.extend.core.ClosedJaxpr(sub, ()))
    return total


# Dense bf16 tensor-core peak TFLOP/s by device kind (vendor datasheets, SXM, no sparsity). MFU is reported
# for bf16 models on these devices only: a float32 matmul's peak depends on whether XLA picks TF32.
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0},
    "H200": {"bfloat16": 989.0},
}


def mfu(flops_per_s: float, dtype: str) -> float | None:
    """Model FLOPs utilisation: achieved over the device's dense peak for the model's dtype."""
    kind = jax.devices()[0].device_kind
    peak = next((p for name, p in PEAK_TFLOPS.items() if name in kind), {}).get(dtype)
    return flops_per_s / (peak * 1e12 * jax.device_count()) if peak else None


def pretrain_table(rows: list[dict]) -> str:
    columns = ("params", 11), ("batch", 6), ("dev", 4), ("steps/s", 9), ("examples/s", 11), ("compile s", 14)
    header = f"{'config':<10} " + " ".join(f"{name:>{width}}" for name, width in columns)
    header += f" {'TFLOP/s':>8} {'MFU':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" + (" (cache)" if r["compile_cached"] else "")
        cells = (f"{r['params']:,}", r["batch"], r["devices"], f"{r['steps_per_s']:.1f}",
                 f"{r['examples_per_s']:.0f}", compile_s)  # fmt: skip
        values = " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True))
        mfu_cell = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"{r['config']:<10} {values} {r['achieved_tflops']:>8.3f} {mfu_cell:>6}")
    return "\n".join(lines)


def onnxruntime_status() -> str:
    """The third peer. There is no ONNX export of these models in the dependencies, so it is never timed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "not installed"
    return "installed; not timed (no ONNX export of the model)"


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
        "device_kind": jax.devices()[0].device_kind,
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


def latency_table(rows: dict[str, dict]) -> str:
    head = "| model | numpy p50 us | numpy p99 us | jax p50 us | jax p99 us | p99 numpy/jax | onnxruntime |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['numpy_p50_us']:,.0f} | {r['numpy_p99_us']:,.0f} | {r['jax_p50_us']:,.0f} "
            f"| {r['jax_p99_us']:,.0f} | {r['p99_ratio']:.2f} | {r['onnxruntime']} |"
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
    p.add_argument("--latency", action="store_true", help="add the policy latency section (numpy vs JAX)")
    p.add_argument("--latency-calls", type=int, default=2000, help="timed calls per policy and peer")
    p.add_argument("--no-sim", action="store_true", help="skip the MJX and C twin sections")
    p.add_argument(
        "--pretrain",
        nargs="*",
        metavar="CONFIG",
        help="add the pretraining section for these configs (default: default vla_tiny)",
    )
    p.add_argument("--pretrain-steps", type=int, default=50, help="updates per timed block")
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
    rows, twins, latency, trains = [], [], {}, []
    if not args.no_sim:
        for task in args.tasks:
            for batch in args.batches:
                rows.append(bench_mjx(task, batch, args.steps, args.reps, args.limit, cache))
                elapsed = time.perf_counter() - start
                print(f"  {task} B={batch}: ratio {rows[-1]['ratio']:.3f} ({elapsed:.0f} s)", flush=True)
        twins = [bench_twin(task, args.twin_steps, args.reps, args.limit) for task in args.tasks]
    if args.latency:
        for name, config in LATENCY_MODELS.items():
            latency[name] = bench_latency(config, args.latency_calls, args.limit)
            print(f"  policy latency {name}: p99 ratio {latency[name]['p99_ratio']:.2f}", flush=True)
    for name in args.pretrain or (["default", "vla_tiny"] if args.pretrain is not None else []):
        trains.append(bench_pretrain(name, args.pretrain_steps, args.reps, args.limit, cache))
        print(f"  pretrain {name}: {trains[-1]['steps_per_s']:.1f} steps/s", flush=True)
    wall = time.perf_counter() - start
    if trains:
        print(f"\nBehaviour-cloning updates, {args.pretrain_steps} per jitted block, median of {args.reps}; "
              "compile = lower+compile of the block\n")  # fmt: skip
        print(pretrain_table(trains))
    if not args.no_sim:
        print(f"\nMJX, {args.steps} control steps per call, median of {args.reps} interleaved reps; "
              "ratio = ours/raw physics steps/s; compile = lower+compile; "
            "one untimed warm-up call each\n")  # fmt: skip
        print(mjx_table(rows))
        print(f"\nC twin, operator driving, {args.twin_steps} control steps, median of {args.reps}\n")
        print(twin_table(twins))
        print(f"\nverified batch sizes (all calls returned): {sorted(set(args.batches))}; wall {wall:.0f} s")
    if args.latency:
        print(f"\nPolicy latency, one observation (batch 1), {args.latency_calls} interleaved calls each "
              f"after {LATENCY_WARMUP} untimed; JAX: jitted, compile excluded, block_until_ready; numpy: "
              f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}\n")  # fmt: skip
        print(latency_table(latency))
        default = latency["state (default)"]
        ratio, p99_ms = default["p99_ratio"], default["numpy_p99_us"] / 1e3
        print(f"\ndefault model targets: numpy p99 <= 0.25x JAX p99: {ratio:.2f}x "
              f"({'met' if ratio <= 0.25 else 'missed'}); <= 2 ms: {p99_ms:.3f} ms "
              f"({'met' if p99_ms <= 2 else 'missed'})")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        result = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()}, "wall_s": wall,
                  "mjx": rows, "twin": twins}  # fmt: skip
        if args.latency:
            result["latency"] = latency
        if trains:
            result["pretrain"] = trains
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
