"""The numpy client section: the robot's batch-1 policy latency, numpy actor against the jitted JAX forward
pass, beside the physical bound of reading its weights once from memory."""

import importlib.util
import math
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxvla import actor
from jaxvla import export
from jaxvla import models
from jaxvla import normalization
from tools.bench.measure import watchdog

# Models timed by the policy latency section: the default (the targets apply to it) and the VLA-scale one.
LATENCY_MODELS = {
    "state (default)": models.ModelConfig(),
    "transformer + image": models.ModelConfig(encoder="transformer", image=True),
}
LATENCY_WARMUP = 200
# The numpy client's target (issue 23): its p50 at most this many times the time to read its weights once
# from memory, the physical bound of a batch-1 forward pass whose weights are not already in cache.
CLIENT_BOUND = 1.5
STREAM_BYTES = 256 << 20  # per array of the bandwidth probe: far beyond any last-level cache


def memory_bandwidth(repeats: int = 5) -> float:
    """Bytes per second one thread reads from memory: a float32 dot product of two STREAM_BYTES arrays
    (numpy's BLAS on one thread, as the client runs), bytes read over the best of `repeats` runs."""
    x = np.ones(STREAM_BYTES // 4, np.float32)
    y = np.ones_like(x)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        x @ y
        best = min(best, time.perf_counter() - t0)
    return (x.nbytes + y.nbytes) / best


def stream_bound(weight_bytes: int, bandwidth: float) -> dict:
    """The client's bound: microseconds to read `weight_bytes` once at `bandwidth`, and CLIENT_BOUND times
    that."""
    stream_us = weight_bytes / bandwidth * 1e6
    return {
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": bandwidth / 1e9,
        "stream_us": stream_us,
        "bound_us": CLIENT_BOUND * stream_us,
    }


def bench_latency(config: models.ModelConfig, calls: int, limit: float, bandwidth: float) -> dict:
    """Batch-1 policy latency: the numpy actor's `infer` vs the jitted JAX forward pass, interleaved.

    Both do the same work on one observation held in numpy (as a robot has it): normalise, run the
    network, tanh. JAX gets params already on the device, its compile timed apart, every call ended by
    `block_until_ready`; the actor runs the exported file, loaded once. p50/p99 over `calls` calls each,
    after LATENCY_WARMUP untimed calls. Beside them, the bound: the policy's float32 weights read once
    at `bandwidth` (bytes/s, `memory_bandwidth`).
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
    weight_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(params))  # float32 in the file
    row = {
        "calls": calls,
        "jax_compile_s": compile_s,
        "onnxruntime": onnxruntime_status(),
        **stream_bound(weight_bytes, bandwidth),
    }
    for name, ns in times.items():
        us = np.asarray(ns) / 1e3
        row[f"{name}_p50_us"], row[f"{name}_p99_us"] = (
            float(np.percentile(us, 50)),
            float(np.percentile(us, 99)),
        )
    row["p99_ratio"] = row["numpy_p99_us"] / row["jax_p99_us"]
    row["numpy_p50_over_stream"] = row["numpy_p50_us"] / row["stream_us"]
    return row


def latency_table(rows: dict[str, dict]) -> str:
    head = (
        "| model | numpy p50 us | numpy p99 us | jax p50 us | jax p99 us | p99 numpy/jax | weights MiB "
        f"| stream once us | bound ({CLIENT_BOUND}x) us | p50 / stream | onnxruntime |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['numpy_p50_us']:,.0f} | {r['numpy_p99_us']:,.0f} | {r['jax_p50_us']:,.0f} "
            f"| {r['jax_p99_us']:,.0f} | {r['p99_ratio']:.2f} | {r['weight_bytes'] / 2**20:.2f} "
            f"| {r['stream_us']:,.0f} | {r['bound_us']:,.0f} | {r['numpy_p50_over_stream']:.2f} "
            f"| {r['onnxruntime']} |"
        )
    return "\n".join(lines)


def onnxruntime_status() -> str:
    """The third peer. There is no ONNX export of these models in the dependencies, so it is never timed."""
    if importlib.util.find_spec("onnxruntime") is None:
        return "not installed"
    return "installed; not timed (no ONNX export of the model)"
