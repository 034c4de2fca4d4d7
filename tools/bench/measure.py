"""The timing protocol every section follows, and the FLOP counts beside the timings.

Compile time is timed apart from steady state (explicit `lower().compile()`, cache hits labelled), every
timer stops after `block_until_ready`, variants alternate their order between repetitions, and every
measurement runs under a watchdog because a jitted MJX step on this CPU has stopped returning before
(docs/mjx-on-cpu.md).
"""

import contextlib
import math
import os
import sys
import threading
import time

import jax

PEER_MISSING = "not installed (pip install -r tools/bench-requirements.txt)"


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


def alternating(variants: dict, rep: int) -> list[tuple]:
    """The variants' items in order on even repetitions, reversed on odd ones: under a shared machine's
    varying load no variant always runs first (or right after the same neighbour)."""
    items = list(variants.items())
    return items[::-1] if rep % 2 else items


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
            total += trips * matmul_flops(
                sub if hasattr(sub, "jaxpr") else jax.extend.core.ClosedJaxpr(sub, ())
            )
    return total


# Dense bf16 tensor-core peak TFLOP/s by device kind (vendor datasheets, SXM, no sparsity). MFU is reported
# for bf16 models on these devices only: a float32 matmul's peak depends on whether XLA picks TF32.
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0},
    "H200": {"bfloat16": 989.0},
}
# HBM bandwidth, GB/s, by device kind (vendor datasheets, SXM).
PEAK_GB_S = {"H100": 3350.0, "H200": 4800.0}


def peak(dtype: str) -> tuple[float | None, float | None]:
    """(FLOP/s, bytes/s): the device's dense matmul peak for `dtype` and its memory bandwidth, or None."""
    kind = jax.devices()[0].device_kind
    name = next((name for name in PEAK_TFLOPS if name in kind), None)
    if name is None:
        return None, None
    flops = PEAK_TFLOPS[name].get(dtype)
    return (flops * 1e12 if flops else None), PEAK_GB_S[name] * 1e9


def mfu(flops_per_s: float, dtype: str) -> float | None:
    """Model FLOPs utilisation: achieved over the device's dense peak for the model's dtype."""
    flops_peak, _ = peak(dtype)
    return flops_per_s / (flops_peak * jax.device_count()) if flops_peak else None
