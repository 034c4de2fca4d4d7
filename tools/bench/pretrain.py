"""The pretraining section: behaviour-cloning updates per second, with their matmul FLOPs and MFU."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import configs
from jaxvla import models
from jaxvla import normalization
from learner import bc
from learner import sharding
from tools.bench.measure import CacheEvents
from tools.bench.measure import matmul_flops
from tools.bench.measure import mfu
from tools.bench.measure import watchdog


def variant(spec: str) -> tuple[configs.Config, int]:
    """A config named with overrides, "vla:batch=1024,remat=true,attention=cudnn": (config, batch size).

    `batch` sets the pretraining batch; any other key is a `ModelConfig` field, parsed by its type."""
    name, _, overrides = spec.partition(":")
    config = configs.get_config(name)
    fields = {f.name for f in dataclasses.fields(config.model)}
    batch, changes = config.pretrain.batch_size, {}
    for item in filter(None, overrides.split(",")):
        key, _, text = item.partition("=")
        if key == "batch":
            batch = int(text)
        elif key in fields:
            default = getattr(config.model, key)
            changes[key] = (
                text.lower() in ("1", "true", "yes") if isinstance(default, bool) else type(default)(text)
            )
        else:
            raise ValueError(f"{spec!r}: {key!r} is neither batch nor a model field ({sorted(fields)})")
    return dataclasses.replace(config, model=dataclasses.replace(config.model, **changes)), batch


def bench_pretrain(spec: str, steps: int, reps: int, limit: float, cache: CacheEvents) -> dict:
    """Behaviour-cloning updates per second for a config's model and batch (`variant`), on all devices.

    One jitted block of `steps` updates (as `jaxvla pretrain` runs them) on a random dataset of 4096
    examples; compile timed apart; the median of `reps` blocks. FLOPs per step are the block's matmul FLOPs
    counted from its jaxpr, so model FLOPs utilisation can be worked out against a device's peak.
    """
    config, batch = variant(spec)
    mc, pc = config.model, config.pretrain
    mesh = sharding.make_mesh()
    batch -= batch % mesh.size
    key_obs, key_chunk = jax.random.split(jax.random.key(0))
    data = {
        "obs": mc.fake_observation(key_obs, 4096),
        "chunk": mc.fake_chunk(key_chunk, 4096),
        "mask": jnp.ones((4096, mc.chunk), bool),
    }
    stats = normalization.compute(jax.device_get(data["obs"]))
    graphdef, params = nnx.split(mc.create_policy(0), nnx.Param)
    optimizer = bc.make_optimizer(pc.optimizer.learning_rate, 1000, 10, pc.optimizer.weight_decay)

    def train_steps(graphdef):
        return bc.make_train_steps(
            graphdef, stats, optimizer, num_steps=steps, batch_size=batch, nll_weight=pc.nll_weight, mesh=mesh
        )

    train = train_steps(graphdef)
    state = jax.device_put(bc.init_state(params, optimizer), sharding.replicated(mesh))
    data = jax.device_put(data, sharding.replicated(mesh))
    key = jax.random.key(1)
    with watchdog(f"pretrain {spec}: compile", limit):
        hits = cache.hits
        t0 = time.perf_counter()
        traced = train.trace(state, data, key)
        compiled = traced.lower().compile()
        compile_s, cached = time.perf_counter() - t0, cache.hits > hits
    if mc.remat:  # MFU counts the model's FLOPs, not the recomputed forward: count them without remat
        plain, _ = nnx.split(dataclasses.replace(mc, remat=False).create_policy(0), nnx.Param)
        traced = train_steps(plain).trace(state, data, key)
    flops_per_step = matmul_flops(traced.jaxpr) / steps
    times = []
    with watchdog(f"pretrain {spec}: steps", limit):
        state, _ = compiled(state, data, key)  # warm-up (and the state is donated: keep the new one)
        for _ in range(reps):
            t0 = time.perf_counter()
            state, metrics = compiled(state, data, key)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    seconds = float(np.median(times))
    return {
        "config": spec,
        "params": models.count_params(nnx.merge(graphdef, params)),
        "batch": batch,
        "devices": mesh.size,
        "steps_per_call": steps,
        "steps_per_s": steps / seconds,
        "examples_per_s": steps * batch / seconds,
        "compile_s": compile_s,
        "compile_cached": cached,
        "flops_per_step": flops_per_step,
        "achieved_tflops": flops_per_step * steps / seconds / 1e12,
        "mfu": mfu(flops_per_step * steps / seconds, mc.dtype),
    }


def pretrain_table(rows: list[dict]) -> str:
    columns = ("params", 11), ("batch", 6), ("dev", 4), ("steps/s", 9), ("examples/s", 11), ("compile s", 14)
    label = max([10, *(len(r["config"]) for r in rows)])
    header = f"{'config':<{label}} " + " ".join(f"{name:>{width}}" for name, width in columns)
    header += f" {'TFLOP/s':>8} {'MFU':>6}"
    lines = [header, "-" * len(header)]
    for r in rows:
        compile_s = f"{r['compile_s']:.1f}" + (" (cache)" if r["compile_cached"] else "")
        cells = (
            f"{r['params']:,}",
            r["batch"],
            r["devices"],
            f"{r['steps_per_s']:.1f}",
            f"{r['examples_per_s']:.0f}",
            compile_s,
        )
        values = " ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, columns, strict=True))
        mfu_cell = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"{r['config']:<{label}} {values} {r['achieved_tflops']:>8.3f} {mfu_cell:>6}")
    return "\n".join(lines)
