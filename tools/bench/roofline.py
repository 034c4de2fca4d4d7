"""Where a transformer config's behaviour-cloning step spends its time: the roofline per op class.

Each class of the step's work runs alone, jitted, forward and backward over all of the encoder's blocks at
the step's shapes (batch x tokens x width, bf16 where the model is): the blocks' dense matmuls, the
attention core, the norms and activations, and the optimizer's update of the whole parameter tree. Each
class gets its time, its matmul FLOPs (from the jaxpr) and its bytes (XLA's cost analysis), and so its
achieved TFLOP/s and GB/s against the device's peaks. What the whole step takes beyond their sum is the
rest: embeddings, heads, loss, the batch's gather, and whatever fusing the classes apart costs.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxvla import tokenizer
from jaxvla.models import ModelConfig
from jaxvla.models.layers import ACTIVATION
from learner import bc
from tools.bench.measure import matmul_flops
from tools.bench.measure import peak
from tools.bench.measure import watchdog
from tools.bench.pretrain import variant


@dataclasses.dataclass(frozen=True)
class Shapes:
    batch: int
    tokens: int
    width: int
    heads: int
    mlp: int
    layers: int
    dtype: jnp.dtype


def step_shapes(mc: ModelConfig, batch: int) -> Shapes:
    if mc.encoder != "transformer":
        raise ValueError(f"the roofline needs a transformer config, not encoder {mc.encoder!r}")
    patches = (mc.image_res // mc.patch_size) ** 2 if mc.image else 0
    tokens = 2 + tokenizer.PROMPT_LENGTH + patches
    mlp = mc.mlp_ratio * mc.width
    return Shapes(batch, tokens, mc.width, mc.attention_heads, mlp, mc.layers, mc.compute_dtype)


def normal(key, shape, dtype, scale=0.02):
    return (jax.random.normal(key, shape) * scale).astype(dtype)


def matmul_case(s: Shapes, key):
    """The four dense layers of every block (qkv, out, up, down) on [batch x tokens, width]."""
    d, m, t = s.width, s.mlp, s.batch * s.tokens
    keys = jax.random.split(key, 5)
    weights = {
        "qkv": normal(keys[0], (s.layers, d, 3 * d), s.dtype),
        "out": normal(keys[1], (s.layers, d, d), s.dtype),
        "up": normal(keys[2], (s.layers, d, m), s.dtype),
        "down": normal(keys[3], (s.layers, m, d), s.dtype),
    }
    x = normal(keys[4], (t, d), s.dtype, 1.0)

    def loss(weights, x):
        def block(x, w):
            attended = (x @ w["qkv"])[:, :d] @ w["out"]
            return x + attended + (x @ w["up"]) @ w["down"], None

        return jnp.sum(jax.lax.scan(block, x, weights)[0].astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1)), (weights, x)


def attention_case(s: Shapes, key, implementation: str):
    """softmax(q k^T) v over [batch, tokens, heads, width / heads], with a key mask, in every block."""
    x = normal(key, (s.batch, s.tokens, s.width), s.dtype, 1.0)
    mask = jnp.ones((s.batch, 1, s.tokens, s.tokens), bool).at[..., -3:].set(False)  # padded prompt words

    def loss(x):
        def block(x, _):
            q = k = v = x.reshape(s.batch, s.tokens, s.heads, s.width // s.heads)
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
            return x + out.reshape(x.shape), None

        return jnp.sum(jax.lax.scan(block, x, None, length=s.layers)[0].astype(jnp.float32))

    return jax.grad(loss), (x,)


def norm_case(s: Shapes, key):
    """Every block's two LayerNorms, its SiLU on the MLP's [tokens, mlp] activations and its residual adds."""
    norm = nnx.LayerNorm(s.width, epsilon=1e-6, dtype=s.dtype, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(norm)
    key_x, key_hidden = jax.random.split(key)
    x = normal(key_x, (s.batch * s.tokens, s.width), s.dtype, 1.0)
    hidden = normal(key_hidden, (s.batch * s.tokens, s.mlp), s.dtype, 1.0)

    def loss(x, hidden):
        layer_norm = nnx.merge(graphdef, params)

        def block(carry, _):
            x, hidden = carry
            x = x + layer_norm(x)
            hidden = ACTIVATION(hidden) + x[:, :1]
            return (x + layer_norm(x), hidden), None

        x, hidden = jax.lax.scan(block, (x, hidden), None, length=s.layers)[0]
        return jnp.sum(x.astype(jnp.float32)) + jnp.sum(hidden.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1)), (x, hidden)


def optimizer_case(mc: ModelConfig):
    """The step's clip + AdamW update of the whole policy's float32 parameters."""
    params = nnx.state(mc.create_policy(0), nnx.Param)
    optimizer = bc.make_optimizer(1e-4, 1000, 10, 0.01)

    def update(params, opt_state, grads):
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return update, (params, optimizer.init(params), params)


def measure_case(name: str, fn, args, reps: int, limit: float) -> dict:
    with watchdog(f"roofline {name}", limit):
        compiled = jax.jit(fn).lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    seconds = float(np.median(times))
    flops = matmul_flops(jax.make_jaxpr(fn)(*args))
    nbytes = float((cost or {}).get("bytes accessed", math.nan))
    return {"class": name, "seconds": seconds, "flops": flops, "bytes": nbytes}


def bench_roofline(spec: str, step_seconds: float | None, reps: int, limit: float) -> dict:
    """Per op class: time, FLOPs, bytes, achieved rates and the roofline's bound, per BC step of `spec`."""
    config, batch = variant(spec)
    s = step_shapes(config.model, batch)
    key = jax.random.key(0)
    cases = {
        "block matmuls": matmul_case(s, key),
        "attention core": attention_case(s, key, config.model.attention),
        "norms, SiLU, residuals": norm_case(s, key),
        "optimizer (clip + AdamW)": optimizer_case(config.model),
    }
    rows = [measure_case(name, fn, args, reps, limit) for name, (fn, args) in cases.items()]
    flops_peak, bandwidth = peak(config.model.dtype)
    for row in rows:
        row["tflops"] = row["flops"] / row["seconds"] / 1e12
        row["gb_s"] = row["bytes"] / row["seconds"] / 1e9
        row["share"] = row["seconds"] / step_seconds if step_seconds else None
        row["of_roofline"] = None
        if flops_peak and bandwidth and row["bytes"] > 0:
            # The roofline: the time the class needs at the better of its two limits.
            bound = max(row["flops"] / flops_peak, row["bytes"] / bandwidth)
            row["bound"] = "compute" if row["flops"] / flops_peak >= row["bytes"] / bandwidth else "memory"
            row["of_roofline"] = bound / row["seconds"]
    return {
        "config": spec,
        "shapes": {k: str(v) for k, v in dataclasses.asdict(s).items()},
        "step_seconds": step_seconds,
        "peak_tflops": flops_peak / 1e12 if flops_peak else None,
        "peak_gb_s": bandwidth / 1e9 if bandwidth else None,
        "rows": rows,
    }


def heading(result: dict, reps: int) -> str:
    s = result["shapes"]
    peaks = "no known peaks for this device"
    if result["peak_gb_s"]:
        peaks = f"this device's peaks {result['peak_tflops']:.0f} TFLOP/s and {result['peak_gb_s']:.0f} GB/s"
    return (
        f"\nRoofline per op class of one {result['config']} BC step: each class alone, forward and backward "
        f"over {s['layers']} blocks at batch {s['batch']} x {s['tokens']} tokens x width {s['width']} "
        f"({s['dtype']}), median of {reps}; FLOPs from the jaxpr, bytes from XLA's cost analysis; {peaks}\n"
    )


def roofline_table(result: dict) -> str:
    header = (
        f"{'op class':<26} {'ms/step':>8} {'of step':>8} {'GFLOP':>8} {'GB':>7} {'TFLOP/s':>8} "
        f"{'GB/s':>7} {'bound':>8} {'of roofline':>12}"
    )
    lines = [header, "-" * len(header)]
    for r in result["rows"]:
        share = f"{r['share']:.0%}" if r["share"] is not None else "-"
        roof = f"{r['of_roofline']:.0%}" if r["of_roofline"] is not None else "-"
        lines.append(
            f"{r['class']:<26} {r['seconds'] * 1e3:>8.2f} {share:>8} {r['flops'] / 1e9:>8.1f} "
            f"{r['bytes'] / 1e9:>7.2f} {r['tflops']:>8.2f} {r['gb_s']:>7.0f} {r.get('bound', '-'):>8} "
            f"{roof:>12}"
        )
    step = result["step_seconds"]
    if step:
        rest = step - sum(r["seconds"] for r in result["rows"])
        lines.append(f"{'the rest of the step':<26} {rest * 1e3:>8.2f} {rest / step:>8.0%}")
        lines.append(f"{'whole BC step':<26} {step * 1e3:>8.2f} {1:>8.0%}")
    return "\n".join(lines)
