"""`jaxvla bench`: simulator throughput, our MJX workcell vs raw `vmap(mjx.step)`, plus the C twin.

With `--latency`, also the robot-side policy latency: the numpy actor vs the jitted JAX forward pass
(`--no-sim` runs that section alone).

Protocol (docs/speed.md): compile time is timed apart from steady state
(explicit `lower().compile()`), every timer stops after `block_until_ready`, ours and raw repetitions are
interleaved, and the reported figure is the median over repetitions. Every measurement runs under a
watchdog because a jitted MJX step on this CPU has stopped returning before (docs/mjx-on-cpu.md).
"""

import argparse
import contextlib
import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
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
from jaxvla import tokenizer  # noqa: E402
from jaxvla.models import config as model_config  # noqa: E402
from jaxvla.models import encoders  # noqa: E402
from learner import bc  # noqa: E402
from learner import patch  # noqa: E402
from learner import replay  # noqa: E402
from learner import sac  # noqa: E402
from learner import sharding  # noqa: E402
from tools import bench_fleet  # noqa: E402
from tools import bench_updates  # noqa: E402

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
    optimizer = bc.make_optimizer(pc.optimizer.learning_rate, 1000, 10, pc.optimizer.weight_decay)
    train = bc.make_train_steps(
        graphdef, stats, optimizer, num_steps=steps, batch_size=batch, nll_weight=pc.nll_weight, mesh=mesh
    )
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
        "config": name,
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
        lines.append(f"{r['config']:<10} {values} {r['achieved_tflops']:>8.3f} {mfu_cell:>6}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ learner and replay
PEER_MISSING = "not installed (pip install -r tools/bench-requirements.txt)"
BLOCK_ROWS, BLOCK_STEPS = 64, 120  # one rollout block per add: 64 envs x 120 control steps
EPISODE_STEPS = 100  # random blocks end about one episode per this many steps
SAMPLE_CALLS = 50  # back-to-back sample calls per timed repetition
# The per-step payload flashbax stores: what a rollout block carries (`valid` and `is_first` only steer our
# insert; our buffer adds segment, sampleable and source, which flashbax has no use for).
FBX_FIELDS = ("obs", "action", "reward", "terminal", "intervention", "version", "reward_source")


def random_block(key: jax.Array, model: models.ModelConfig) -> dict:
    """A rollout block [BLOCK_ROWS, BLOCK_STEPS, ...] as `replay.insert` takes it: random observations and
    actions, every step valid, about one episode end per EPISODE_STEPS steps."""
    rows, steps = BLOCK_ROWS, BLOCK_STEPS
    key_obs, key_action, key_reward, key_end = jax.random.split(key, 4)
    obs = model.fake_observation(key_obs, rows * steps)
    terminal = jax.random.uniform(key_end, (rows, steps)) < 1.0 / EPISODE_STEPS
    return {
        "obs": {k: v.reshape(rows, steps, *v.shape[1:]) for k, v in obs.items()},
        "action": jax.random.uniform(key_action, (rows, steps, model.action_size), minval=-1.0, maxval=1.0),
        "reward": jax.random.normal(key_reward, (rows, steps)),
        "terminal": terminal,
        "valid": jnp.ones((rows, steps), bool),
        "is_first": jnp.concatenate([jnp.ones((rows, 1), bool), terminal[:, :-1]], axis=1),
        "intervention": jnp.zeros((rows, steps), bool),
        "version": jnp.zeros((rows, steps), jnp.int32),
        "reward_source": jnp.full((rows, steps), replay.OPERATOR_REWARD, jnp.int8),
    }


def fbx_sequence_length(n_step: int, chunk: int) -> int:
    """Steps a flashbax sample needs: the chunk's actions and the observation n_step steps later."""
    return max(n_step + 1, chunk)


def fbx_buffer(capacity: int, sample_batch: int, sequence_length: int):
    """flashbax's trajectory buffer over the same `capacity` steps, one row per env of the rollout block.

    The closest flashbax equivalent of our replay: its flat buffer samples 2-step sequences (one-step
    transitions) and its item buffer keeps no time order, while an n-step target with an action chunk needs
    n_step + 1 consecutive steps. So: the trajectory buffer, sequences of n_step + 1 steps, period 1 (every
    step may start one, as every sampleable slot may in ours); `fbx_transitions` then turns a sequence into
    the n-step transition that our `replay.sample` returns directly.
    """
    import flashbax

    return flashbax.make_trajectory_buffer(
        add_batch_size=BLOCK_ROWS,
        sample_batch_size=sample_batch,
        sample_sequence_length=sequence_length,
        period=1,
        min_length_time_axis=sequence_length,
        max_length_time_axis=capacity // BLOCK_ROWS,
    )


def fbx_transitions(sequences: dict, source: jax.Array, *, n_step: int, chunk: int, gamma: float) -> dict:
    """flashbax sequences {field: [B, L, ...]} of consecutive steps -> the batch `sac.update` reads.

    The semantics of `replay.gather`: the reward sum and the chunk stop at the first terminal step and the
    target does not bootstrap past it. flashbax's rows hold one env each, so consecutive steps of a row are
    consecutive steps of the env and only terminal steps separate episodes. source [B] int8.
    """
    terminal = sequences["terminal"]
    alive = (jnp.cumsum(terminal, axis=1) - terminal) == 0  # [B, L]: no terminal step before this one
    powers = jnp.asarray(gamma, jnp.float32) ** jnp.arange(n_step, dtype=jnp.float32)
    reward = jnp.sum(jnp.where(alive[:, :n_step], sequences["reward"][:, :n_step], 0.0) * powers, axis=1)
    done = jnp.any(terminal[:, :n_step], axis=1)
    chunk_mask = alive[:, :chunk]
    weight = jnp.ones(reward.shape, jnp.float32)
    return {
        "obs": {k: v[:, 0] for k, v in sequences["obs"].items()},
        "chunk": jnp.where(chunk_mask[..., None], sequences["action"][:, :chunk], 0.0),
        "chunk_mask": chunk_mask,
        "reward": reward,
        "discount": jnp.where(done, 0.0, jnp.float32(gamma**n_step)),
        "next_obs": {k: v[:, n_step] for k, v in sequences["obs"].items()},
        "weight": weight,
        "source": source,
    }


def fbx_draw_batches(
    fbx_states: list, key: jax.Array, *, spec: sac.Spec, mixer, counts: dict[str, int]
) -> dict:
    """`sac.draw_batches` from flashbax buffers: utd + 1 normalised mixed batches [utd + 1, B, ...], drawn
    vectorised over the batches as ours are. As `sac.train_steps`' `draw_fn`, it feeds the same keys,
    normalisation and `sac.update` from flashbax's replay, so only the sampling differs."""
    config = spec.config
    source = jnp.concatenate(
        [jnp.full((count,), replay.SOURCES.index(name), jnp.int8) for name, count in counts.items()]
    )

    def draw(key):
        sequences = mixer.sample(fbx_states, key).experience
        batch = fbx_transitions(sequences, source, n_step=spec.chunk, chunk=spec.chunk, gamma=config.gamma)
        return sac.normalize_batch(batch, spec.nets.stats)

    return jax.vmap(draw)(jax.random.split(key, config.utd + 1))


def unfused_programs(spec: sac.Spec) -> tuple:
    """The same train step without fusion, as three jitted functions a Python loop calls: draw one
    normalised mixed batch, one critic update, one actor and temperature update."""
    config = spec.config

    def draw(buffers, key):
        batch = replay.sample_mixed(
            buffers, sac.mix_ratios(config), key, config.batch_size, chunk=spec.chunk, gamma=config.gamma
        )
        return sac.normalize_batch(batch, spec.nets.stats)

    def actor(state, batch, key):
        return sac.actor_update(state, batch, key, spec=spec, enabled=state.step > config.critic_warmup)

    return draw, functools.partial(sac.critic_update, spec=spec), actor


def unfused_block(
    state: sac.SACState, buffers: dict, keys: list, *, steps: int, utd: int, draw, critic, actor
) -> tuple[sac.SACState, dict]:
    """`steps` train steps from Python: per step utd + 1 batches, utd critic calls, one actor call."""
    keys = iter(keys)
    for _ in range(steps):
        for _ in range(utd):
            state, _ = critic(state, draw(buffers, next(keys)), next(keys))
        state, metrics = actor(state, draw(buffers, next(keys)), next(keys))
    return state, metrics


def torch_spec(
    model: models.ModelConfig,
    config,
    counts: dict[str, int],
    capacities: dict[str, int],
    steps: int,
    reps: int,
) -> dict:
    """Sizes and hyperparameters for tools/bench_torch.py, from the configs the JAX side runs."""
    if model.encoder != "state" or model.image or model.advantage_conditioned:
        raise ValueError("the PyTorch reference mirrors the state encoder without image or indicator only")
    return {
        "state_sizes": {k: model_config.STATE_SHAPES[k][0] for k in encoders.STATE_KEYS},
        "prompt_length": tokenizer.PROMPT_LENGTH,
        "vocabulary": len(tokenizer.VOCABULARY),
        "pad": tokenizer.PAD,
        "width": model.width,
        "depth": model.depth,
        "prompt_dim": model.prompt_dim,
        "chunk": model.chunk,
        "action_size": model.action_size,
        "ensemble": model.ensemble,
        "log_std_range": list(model.log_std_range),
        "counts": list(counts.values()),
        "capacities": list(capacities.values()),
        "utd": config.utd,
        "gamma": config.gamma,
        "tau": config.tau,
        "init_alpha": config.init_alpha,
        "actor_lr": config.actor_lr,
        "critic_lr": config.critic_lr,
        "alpha_lr": config.alpha_lr,
        "target_entropy": config.target_entropy_per_dim * model.chunk * model.action_size,
        "bc_weight": config.bc_weight,
        "bc_sources": [replay.SOURCES.index(s) for s in config.bc_sources],
        "nll_weight": config.nll_weight,
        "steps": steps,
        "reps": reps,
        "seed": 0,
    }


def torch_threads() -> list[int]:
    """Thread counts the PyTorch reference runs with: the machine's cores, and one.

    One as well because eager PyTorch's OpenMP pool slows down when another process holds a core: the
    reference is the faster of the two, and the ratio at the machine's cores (as many threads as XLA's pool)
    is reported beside it.
    """
    return sorted({os.cpu_count() or 1, 1}, reverse=True)


class TorchWorker:
    """tools/bench_torch.py serving timed repetitions in its own process (torch's pool never competes with
    XLA's: each side waits while the other runs), so its repetitions interleave with the JAX ones."""

    def __init__(self, spec: dict, threads: int, limit: float):
        self.threads, self.limit, self.utd, self.times = threads, limit, spec["utd"], []
        command = [
            sys.executable,
            "-m",
            "tools.bench_torch",
            "--serve",
            "--spec",
            json.dumps({**spec, "threads": threads}),
        ]
        # OpenMP threads that sleep at a barrier instead of spinning: spinning, 2 threads on this shared
        # 2-core machine ran 8x slower than sleeping (0.5 against 4.1 train steps/s, load 8), which made the
        # peer look slower than it is. stderr is inherited: a pipe nobody reads could fill and block.
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        self.process = subprocess.Popen(
            command,
            cwd=Path(__file__).resolve().parent.parent,
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )
        with watchdog(f"learner: pytorch {threads} threads warm-up", limit):
            self.info = json.loads(self._line())

    def _line(self) -> str:
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"tools.bench_torch exited with {self.process.wait()} (its stderr is above)")
        return line

    def repetition(self) -> float:
        """Seconds of one repetition of `steps` train steps, timed inside the worker."""
        with watchdog(f"learner: pytorch {self.threads} threads repetition", self.limit):
            self.process.stdin.write("\n")
            self.process.stdin.flush()
            return float(self._line())

    def close(self) -> dict:
        """The run's figures from the repetitions timed so far (the first one, a warm-up, left out)."""
        self.process.stdin.close()
        self.process.wait(timeout=self.limit)
        seconds = statistics.median(self.times)
        steps = self.info["steps_per_call"]
        return {
            **self.info,
            "train_steps_per_s": steps / seconds,
            "call_s": self.times,
            "critic_updates_per_s": steps * self.utd / seconds,
        }


def start_torch(spec: dict, limit: float) -> list[TorchWorker]:
    """One serving worker per thread count of `torch_threads`; none when torch is not installed."""
    if importlib.util.find_spec("torch") is None:
        return []
    return [TorchWorker(spec, threads, limit) for threads in torch_threads()]


def torch_result(workers: list[TorchWorker]) -> dict:
    """The fastest thread count's figures, every run under "runs", or a status saying torch is missing."""
    if not workers:
        return {"status": PEER_MISSING}
    runs = [worker.close() for worker in workers]
    best = max(runs, key=lambda run: run["train_steps_per_s"])
    same = next(run for run in runs if run["threads"] == max(torch_threads()))
    return {"status": "measured", **best, "runs": runs, "same_threads": same}


def alternating(variants: dict, rep: int) -> list[tuple]:
    """The variants' items in order on even repetitions, reversed on odd ones: under a shared machine's
    varying load no variant always runs first (or right after the same neighbour)."""
    items = list(variants.items())
    return items[::-1] if rep % 2 else items


def rates(call_s: list[float], steps: int, utd: int) -> dict:
    seconds = statistics.median(call_s)
    return {
        "train_steps_per_s": steps / seconds,
        "critic_updates_per_s": steps * utd / seconds,
        "call_s": call_s,
    }


def bench_learner(steps: int, reps: int, limit: float, cache: CacheEvents) -> dict:
    """SAC train steps per second on one device: fused (ours, and flashbax's replay), unfused, PyTorch.

    The default config's model and SAC settings; replay buffers of the patching capacities, filled with
    random rollout blocks. Fused: `steps` train steps in one jitted call, batches sampled on-device
    inside it; unfused: the same from a Python loop of jitted calls. Compiles timed apart, one untimed
    call first, repetitions interleaved, medians reported.
    """
    config = configs.get_config("default")
    mc = config.model
    # No critic warm-up, so the actor and temperature update applies from the first step in every
    # implementation (JAX computes it during warm-up too and only discards it).
    sc = dataclasses.replace(config.sac, critic_warmup=0)
    mesh = sharding.make_mesh(jax.devices()[:1])
    counts = replay.mix_counts(dict(zip(replay.SOURCES, sc.mix, strict=True)), sc.batch_size, 1)
    capacities = dict(zip(replay.SOURCES, config.patch.capacity, strict=True))
    stats = normalization.compute(jax.device_get(mc.fake_observation(jax.random.key(0), 4096)))
    actor_graph, actor = nnx.split(mc.create_policy(0), nnx.Param)
    critic_graph, critic = nnx.split(mc.create_critic(1), nnx.Param)
    spec = sac.make_spec(sc, mc, sac.Networks(actor=actor_graph, critic=critic_graph, stats=stats))

    def fresh_state() -> sac.SACState:  # each variant donates its own copy
        copies = jax.tree.map(jnp.copy, (actor, critic))
        return sac.init_state(*copies, sc.init_alpha, spec.optimizers)

    with_fbx = importlib.util.find_spec("flashbax") is not None
    length = fbx_sequence_length(mc.chunk, mc.chunk)
    make_block = jax.jit(functools.partial(random_block, model=mc))
    insert = patch.make_insert()
    buffers, fbx_buffers, fbx_states = {}, [], []
    with watchdog("learner: fill replay", limit):
        for source, (name, capacity) in enumerate(capacities.items()):
            buffers[name] = replay.create(
                patch.observation_spec(mc), mc.action_size, capacity, mesh, n_step=mc.chunk
            )
            if with_fbx:
                fbx_buffers.append(fbx_buffer(capacity, counts[name], length))
                first = jax.tree.map(lambda x: x[0, 0], random_block(jax.random.key(0), mc))
                fbx_states.append(fbx_buffers[-1].init({k: first[k] for k in FBX_FIELDS}))
                fbx_add = jax.jit(fbx_buffers[-1].add, donate_argnums=0)
            for i in range(-(-capacity // (BLOCK_ROWS * BLOCK_STEPS))):
                block = make_block(jax.random.fold_in(jax.random.key(source), i))
                buffers[name] = insert(buffers[name], block, source=source)
                if with_fbx:
                    fbx_states[-1] = fbx_add(fbx_states[-1], {k: block[k] for k in FBX_FIELDS})
        jax.block_until_ready((buffers, fbx_states))

    key = jax.random.key(1)
    # Keys of the unfused loop are split before the clock starts: the fused call derives its own inside.
    per_call = steps * (sc.utd + 1) * 2
    unfused_keys = [list(jax.random.split(jax.random.fold_in(key, rep), per_call)) for rep in range(reps + 1)]
    fused_fn = sac.make_train_steps(spec, num_steps=steps, mesh=mesh)
    draw, critic_fn, actor_fn = unfused_programs(spec)
    states = {"fused": fresh_state(), "unfused": fresh_state()}
    compiled, compile_s, cached = {}, {}, {}
    with watchdog("learner: compile fused", limit):
        hits, t0 = cache.hits, time.perf_counter()
        traced = fused_fn.trace(states["fused"], buffers, key)
        compiled["fused"] = traced.lower().compile()
        compile_s["fused"], cached["fused"] = time.perf_counter() - t0, cache.hits > hits
    flops = matmul_flops(traced.jaxpr) / steps
    with watchdog("learner: compile unfused", limit):
        hits, t0 = cache.hits, time.perf_counter()
        draw_c = jax.jit(draw).lower(buffers, key).compile()
        batch = draw_c(buffers, key)
        critic_c = jax.jit(critic_fn, donate_argnums=0).lower(states["unfused"], batch, key).compile()
        actor_c = jax.jit(actor_fn, donate_argnums=0).lower(states["unfused"], batch, key).compile()
        compile_s["unfused"], cached["unfused"] = time.perf_counter() - t0, cache.hits > hits
    unfused = functools.partial(
        unfused_block, steps=steps, utd=sc.utd, draw=draw_c, critic=critic_c, actor=actor_c
    )
    calls = {
        "fused": lambda state, rep: compiled["fused"](state, buffers, key),
        "unfused": lambda state, rep: unfused(state, buffers, unfused_keys[rep]),
    }
    if with_fbx:
        import flashbax

        mixer = flashbax.make_mixer(fbx_buffers, sc.batch_size, list(counts.values()))
        fbx_draw = functools.partial(fbx_draw_batches, mixer=mixer, counts=counts)
        fbx_fn = jax.jit(
            functools.partial(sac.train_steps, spec=spec, num_steps=steps, draw_fn=fbx_draw), donate_argnums=0
        )
        states["flashbax"] = fresh_state()
        with watchdog("learner: compile flashbax fused", limit):
            hits, t0 = cache.hits, time.perf_counter()
            compiled["flashbax"] = fbx_fn.lower(states["flashbax"], fbx_states, key).compile()
            compile_s["flashbax"], cached["flashbax"] = time.perf_counter() - t0, cache.hits > hits
        calls["flashbax"] = lambda state, rep: compiled["flashbax"](state, fbx_states, key)
        draws = bench_draws(buffers, fbx_states, fbx_draw, spec, reps, limit)
    else:
        draws = {"draw_flashbax": {"status": PEER_MISSING}}

    workers = start_torch(torch_spec(mc, sc, counts, capacities, steps, reps), limit)
    times = {name: [] for name in calls}
    for rep in range(reps + 1):  # repetition 0 is the untimed warm-up
        for name, call in alternating(calls, rep):
            with watchdog(f"learner: {name} rep {rep}", limit):
                t0 = time.perf_counter()
                states[name], metrics = jax.block_until_ready(call(states[name], rep))
                if rep:
                    times[name].append(time.perf_counter() - t0)
        for worker in workers:
            seconds = worker.repetition()
            if rep:
                worker.times.append(seconds)
    result = {
        "config": "default",
        "device": jax.devices()[0].device_kind,
        "batch": sc.batch_size,
        "utd": sc.utd,
        "steps_per_call": steps,
        "capacities": capacities,
        "params": models.count_params(nnx.merge(actor_graph, actor))
        + models.count_params(nnx.merge(critic_graph, critic)),
        "flops_per_train_step": flops,
    }
    for name in ("fused", "flashbax", "unfused"):
        if name in times:
            result[f"jax_{name}"] = {
                **rates(times[name], steps, sc.utd),
                "compile_s": compile_s[name],
                "compile_cached": cached[name],
            }
        else:
            result[f"jax_{name}"] = {"status": PEER_MISSING}
    result["jax_fused"]["gflops"] = flops * result["jax_fused"]["train_steps_per_s"] / 1e9
    result["torch"] = torch_result(workers)
    return {**result, **draws}


DRAW_STEPS = 20  # train steps' batches drawn per call of the fused-draw programs


def bench_draws(buffers: dict, fbx_states: list, fbx_draw, spec: sac.Spec, reps: int, limit: float) -> dict:
    """The sampling of the fused train step alone: DRAW_STEPS train steps' batches (utd + 1 mixed batches
    each, normalised) per jitted call, ours (`sac.draw_batches`) against flashbax's (`fbx_draw`, a bound
    `fbx_draw_batches`), repetitions alternating, medians reported."""
    ours = functools.partial(sac.draw_batches, spec=spec)
    theirs = functools.partial(fbx_draw, spec=spec)

    def steps_of(draw):  # one program drawing DRAW_STEPS steps' batches, as the fused scan does
        def program(data, key):
            return jax.lax.map(lambda k: draw(data, k), jax.random.split(key, DRAW_STEPS))

        return jax.jit(program)

    programs = {"draw_ours": (steps_of(ours), buffers), "draw_flashbax": (steps_of(theirs), fbx_states)}
    key = jax.random.key(3)
    with watchdog("learner: compile fused draws", limit):
        compiled = {name: fn.lower(data, key).compile() for name, (fn, data) in programs.items()}
    times = {name: [] for name in programs}
    for rep in range(reps + 1):  # repetition 0 is the untimed warm-up
        for name, (_, data) in alternating(programs, rep):
            with watchdog(f"learner: {name} rep {rep}", limit):
                t0 = time.perf_counter()
                jax.block_until_ready(compiled[name](data, jax.random.fold_in(key, rep)))
                if rep:
                    times[name].append(time.perf_counter() - t0)
    return {
        name: {"draw_steps_per_s": DRAW_STEPS / statistics.median(t), "call_s": t}
        for name, t in times.items()
    }


def bench_replay(capacity: int, reps: int, limit: float, cache: CacheEvents) -> dict:
    """Replay add and sample items per second, ours vs flashbax, standalone jitted calls on one device.

    Add: `capacity` / block-size + 1 blocks of [BLOCK_ROWS, BLOCK_STEPS] random steps (the ring fills and
    wraps), interleaved call by call, each call ended by `block_until_ready`, buffers donated; the median
    call. Sample: SAMPLE_CALLS back-to-back calls of batch `sac.batch_size` (n-step = chunk = H) on the
    full buffer, then one `block_until_ready`; the median of `reps` such runs.
    """
    config = configs.get_config("default")
    mc, sc = config.model, config.sac
    mesh = sharding.make_mesh(jax.devices()[:1])
    with_fbx = importlib.util.find_spec("flashbax") is not None
    length = fbx_sequence_length(mc.chunk, mc.chunk)
    block_items = BLOCK_ROWS * BLOCK_STEPS
    blocks = [jax.jit(random_block, static_argnums=1)(jax.random.key(i), mc) for i in range(4)]
    fbx_blocks = [{k: b[k] for k in FBX_FIELDS} for b in blocks]
    source = replay.SOURCES.index("online")
    insert = functools.partial(replay.insert, source=source)
    sample = functools.partial(replay.sample, batch_size=sc.batch_size, chunk=mc.chunk, gamma=sc.gamma)
    key = jax.random.key(2)
    programs, compile_s, cached, buffers = {}, {}, {}, {}

    def compile_into(name: str, fn, *args, donate: bool):
        with watchdog(f"replay: compile {name}", limit):
            hits, t0 = cache.hits, time.perf_counter()
            programs[name] = jax.jit(fn, donate_argnums=0 if donate else ()).lower(*args).compile()
            compile_s[name], cached[name] = time.perf_counter() - t0, cache.hits > hits

    buffers["ours"] = replay.create(
        patch.observation_spec(mc), mc.action_size, capacity, mesh, n_step=mc.chunk
    )
    compile_into("ours add", insert, buffers["ours"], blocks[0], donate=True)
    if with_fbx:
        fbx = fbx_buffer(capacity, sc.batch_size, length)
        buffers["flashbax"] = fbx.init(jax.tree.map(lambda x: x[0, 0], fbx_blocks[0]))
        compile_into("flashbax add", fbx.add, buffers["flashbax"], fbx_blocks[0], donate=True)
    adds = {name: [] for name in buffers}
    for i in range(capacity // block_items + 1):
        for name, _ in alternating(buffers, i):
            block = (fbx_blocks if name == "flashbax" else blocks)[i % len(blocks)]
            with watchdog(f"replay: {name} add {i}", limit):
                t0 = time.perf_counter()
                buffers[name] = jax.block_until_ready(programs[f"{name} add"](buffers[name], block))
                adds[name].append(time.perf_counter() - t0)

    compile_into("ours sample", sample, buffers["ours"], key, donate=False)
    samplers = {"ours": ("ours sample", buffers["ours"])}
    if with_fbx:
        compile_into("flashbax sample", fbx.sample, buffers["flashbax"], key, donate=False)
        as_batch = functools.partial(fbx_transitions, n_step=mc.chunk, chunk=mc.chunk, gamma=sc.gamma)
        source_ids = jnp.full((sc.batch_size,), source, jnp.int8)

        def sample_nstep(state, key):
            return as_batch(fbx.sample(state, key).experience, source_ids)

        compile_into("flashbax sample + n-step", sample_nstep, buffers["flashbax"], key, donate=False)
        samplers["flashbax"] = ("flashbax sample", buffers["flashbax"])
        samplers["flashbax_nstep"] = ("flashbax sample + n-step", buffers["flashbax"])
    keys = list(jax.random.split(key, SAMPLE_CALLS))
    samples = {name: [] for name in samplers}
    for rep in range(reps + 1):  # repetition 0 is the untimed warm-up
        for name, (program, buffer) in alternating(samplers, rep):
            with watchdog(f"replay: {name} sample rep {rep}", limit):
                t0 = time.perf_counter()
                jax.block_until_ready([programs[program](buffer, k) for k in keys])
                if rep:
                    samples[name].append(time.perf_counter() - t0)

    result = {
        "capacity": capacity,
        "block": [BLOCK_ROWS, BLOCK_STEPS],
        "batch": sc.batch_size,
        "n_step": mc.chunk,
        "chunk": mc.chunk,
        "sample_calls": SAMPLE_CALLS,
        "bytes": replay.memory_bytes(buffers["ours"]),
    }
    for name in ("ours", "flashbax", "flashbax_nstep"):
        if name not in samplers:
            result[name] = {"status": PEER_MISSING}
            continue
        program = samplers[name][0]
        row = {
            "sample_items_per_s": SAMPLE_CALLS * sc.batch_size / statistics.median(samples[name]),
            "sample_compile_s": compile_s[program],
            "sample_compile_cached": cached[program],
            "sample_s": samples[name],
        }
        if name in adds:
            row["add_items_per_s"] = block_items / statistics.median(adds[name])
            row["add_s"] = adds[name]
            row["add_compile_s"], row["add_compile_cached"] = compile_s[f"{name} add"], cached[f"{name} add"]
        result[name] = row
    return result


def paired_spread(ours_s: list[float], peer_s: list[float], repetitions: int) -> list[float]:
    """[min, max] of the per-repetition speed ratios ours / peer (peer seconds over ours for the same work).

    Repetition i of both ran back to back, so the ratios pair runs under the same load. Calls timed one by
    one (replay adds) are first summed into `repetitions` consecutive groups.
    """
    groups = min(repetitions, len(ours_s), len(peer_s))

    def grouped(times: list[float]) -> list[float]:
        return [float(np.sum(part)) for part in np.array_split(np.asarray(times[: len(ours_s)]), groups)]

    ratios = [peer / ours for ours, peer in zip(grouped(ours_s), grouped(peer_s), strict=True)]
    return [min(ratios), max(ratios)]


# Each ratio: (ours, the peer, the rate compared, the per-repetition times compared for the spread).
RATIO_SOURCES = {
    "fused_over_torch": ("jax_fused", "torch", "train_steps_per_s", "call_s"),
    "fused_over_torch_same_threads": ("jax_fused", "torch_same_threads", "train_steps_per_s", "call_s"),
    "fused_over_unfused": ("jax_fused", "jax_unfused", "train_steps_per_s", "call_s"),
    "fused_over_flashbax_fused": ("jax_fused", "jax_flashbax", "train_steps_per_s", "call_s"),
    "draw_over_flashbax": ("draw_ours", "draw_flashbax", "draw_steps_per_s", "call_s"),
    "add_over_flashbax": ("ours", "flashbax", "add_items_per_s", "add_s"),
    "sample_over_flashbax": ("ours", "flashbax", "sample_items_per_s", "sample_s"),
    "sample_over_flashbax_nstep": ("ours", "flashbax_nstep", "sample_items_per_s", "sample_s"),
}


def learner_ratios(learner: dict, replay_row: dict, reps: int) -> dict:
    """The issue's ratios of medians, each with the spread of its per-repetition ratios; None where a peer
    is missing."""
    rows = {**learner, **replay_row, "torch_same_threads": learner["torch"].get("same_threads", {})}
    ratios = {}
    for key, (ours_name, peer_name, rate, times) in RATIO_SOURCES.items():
        ours, peer = rows.get(ours_name, {}), rows.get(peer_name, {})
        if rate not in ours or rate not in peer:
            ratios[key] = None
            continue
        spread = paired_spread(ours[times], peer[times], reps)
        ratios[key] = {"value": ours[rate] / peer[rate], "spread": spread}
    return ratios


def learner_table(r: dict) -> str:
    head = (
        "| implementation | batches from | train steps/s | critic updates/s | ms / train step "
        "| compile (JAX) or warm-up (torch) s |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    rows = [
        ("JAX fused", "ours, sampled inside the jit", r["jax_fused"]),
        ("JAX fused", "flashbax, sampled inside the jit", r["jax_flashbax"]),
        ("JAX unfused", "ours, jitted calls from Python", r["jax_unfused"]),
    ]
    for run in r["torch"].get("runs", [r["torch"]]):
        name = "PyTorch"
        if "torch" in run:
            name += f" {run['torch']} eager, {run['threads']} thread" + "s" * (run["threads"] > 1)
        rows.append((name, "torch.randint over tensors", run))
    for name, source, row in rows:
        if "train_steps_per_s" not in row:
            lines.append(f"| {name} | {source} | {row['status']} | | | |")
            continue
        if "compile_s" in row:
            compile_s = f"{row['compile_s']:.1f}" + (" (cache)" if row["compile_cached"] else "")
        else:
            compile_s = f"{row['warmup_s']:.2f} ({row['warmup_steps']} steps)"
        lines.append(
            f"| {name} | {source} | {row['train_steps_per_s']:,.1f} | {row['critic_updates_per_s']:,.0f} "
            f"| {1e3 / row['train_steps_per_s']:.2f} | {compile_s} |"
        )
    return "\n".join(lines)


def replay_table(r: dict) -> str:
    lines = [
        "| replay | add items/s | sample items/s | add compile s | sample compile s |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "ours": "ours (n-step transitions)",
        "flashbax": "flashbax trajectory (raw sequences)",
        "flashbax_nstep": "flashbax trajectory + n-step batch",
    }
    for key, name in names.items():
        row = r[key]
        if "sample_items_per_s" not in row:
            lines.append(f"| {name} | {row['status']} | | | |")
            continue
        add = f"{row['add_items_per_s']:,.0f}" if "add_items_per_s" in row else "-"
        add_c = f"{row['add_compile_s']:.2f}" if "add_compile_s" in row else "-"
        lines.append(
            f"| {name} | {add} | {row['sample_items_per_s']:,.0f} | {add_c} | {row['sample_compile_s']:.2f} |"
        )
    return "\n".join(lines)


# Labels of the learner's ratios and the targets issue 23 set (None: reported, no target).
RATIO_LABELS = {
    "fused_over_torch": ("SAC fused JAX / PyTorch eager at its fastest thread count, train steps/s", 1.5),
    "fused_over_torch_same_threads": ("SAC fused JAX / PyTorch eager on as many threads, train steps/s", 1.5),
    "fused_over_unfused": ("SAC fused / unfused JAX, train steps/s", None),
    "fused_over_flashbax_fused": ("SAC fused, our replay / flashbax, train steps/s", 0.9),
    "draw_over_flashbax": ("fused sample (a train step's batches, in one jit), ours / flashbax", 1.0),
    "add_over_flashbax": ("replay add, ours / flashbax", 1.0),
    "sample_over_flashbax": ("replay sample, ours / flashbax raw sequences", 1.0),
    "sample_over_flashbax_nstep": ("replay sample, ours / flashbax + n-step", 1.0),
}


def ratio_text(ratio: dict | None) -> str:
    """'1.23x (per repetition 1.10-1.35)', or the missing peer's status."""
    if ratio is None:
        return PEER_MISSING
    low, high = ratio["spread"]
    return f"{ratio['value']:.2f}x (per repetition {low:.2f}-{high:.2f})"


def ratio_lines(ratios: dict) -> str:
    lines = []
    for key, (label, target) in RATIO_LABELS.items():
        ratio, text = ratios[key], ratio_text(ratios[key])
        if target is not None and ratio is not None:
            text += f" (target >= {target}: {'met' if ratio['value'] >= target else 'missed'})"
        lines.append(f"{label}: {text}")
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


# -------------------------------------------------------------------------------------------- main
def fleet_policy_file() -> bytes:
    """The default model (untrained) exported as the robots receive it."""
    model = configs.get_config("default").model
    _, params = nnx.split(model.create_policy(0), nnx.Param)
    stats = normalization.compute(jax.device_get(model.fake_observation(jax.random.key(0), 256)))
    with tempfile.TemporaryDirectory() as tmp:
        path = export.write(
            Path(tmp), model, params, stats, version=1, parent_version=None, config_hash="bench"
        )
        return path.read_bytes()


def machine_line(info: dict, wall: float) -> str:
    return (
        f"jax {info['jax']} ({info['jax_backend']}), mujoco {info['mujoco']}, mjx {info['mujoco_mjx']}; "
        f"load {info['load_avg_1m']:.2f} at the start; {wall / 60:.1f} min in all."
    )


def ratios_table(mjx_rows: list[dict], latency: dict, learner: dict) -> str:
    """Every measured ratio against its peer, with its target where an issue set one."""
    rows = [
        (f"MJX workcell {r['task']} B={r['batch']}: ours / raw mjx.step, steps/s", f"{r['ratio']:.2f}x", None)
        for r in mjx_rows
    ]
    if "state (default)" in latency:
        r = latency["state (default)"]
        rows.append(
            (
                "numpy client p50 / its weights streamed once from memory (lower is better)",
                f"{r['numpy_p50_over_stream']:.2f}x ({r['numpy_p50_us']:.0f} us; stream "
                f"{r['stream_us']:.0f} us)",
                f"<= {CLIENT_BOUND}",
            )
        )
    for key, (label, target) in RATIO_LABELS.items():
        if learner.get("ratios", {}).get(key) is not None:
            rows.append((label, ratio_text(learner["ratios"][key]), f">= {target}" if target else None))
    lines = ["| ratio | value | target |", "|---|---:|---|"]
    lines += [f"| {label} | {value} | {target or '-'} |" for label, value, target in rows]
    return "\n".join(lines)


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
        help="add the pretraining section for these configs (default: default vla_tiny)",
    )
    p.add_argument("--pretrain-steps", type=int, default=50, help="updates per timed block")
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
        bandwidth = memory_bandwidth()
        for name, config in LATENCY_MODELS.items():
            latency[name] = bench_latency(config, args.latency_calls, args.limit, bandwidth)
            print(f"  policy latency {name}: p99 ratio {latency[name]['p99_ratio']:.2f}", flush=True)
    for name in args.pretrain or (["default", "vla_tiny"] if args.pretrain is not None else []):
        trains.append(bench_pretrain(name, args.pretrain_steps, args.reps, args.limit, cache))
        print(f"  pretrain {name}: {trains[-1]['steps_per_s']:.1f} steps/s", flush=True)
    learner = {}
    if args.learner:
        learner = bench_learner(args.learner_steps, args.reps, args.limit, cache)
        print(f"  learner: fused {learner['jax_fused']['train_steps_per_s']:.1f} train steps/s", flush=True)
        learner["replay"] = bench_replay(args.replay_capacity, args.reps, args.limit, cache)
        learner["ratios"] = learner_ratios(learner, learner["replay"], args.reps)
    updates = {}
    if args.updates:
        updates = bench_updates.run(args.updates_steps, args.reps)
        print(f"  updates: PRO {updates['pro']['steps_per_s']:.2f} steps/s", flush=True)
    fleet = {}
    if args.fleet:
        fleet = bench_fleet.run(fleet_policy_file(), args.fleet_episodes, args.fleet_steps)
    wall = time.perf_counter() - start
    if fleet:
        emit(
            "\nFleet on loopback: episodes of 120 steps pushed one per request, acknowledged once fsynced; "
            "default model's params file; actor loop = twin + numpy policy under RateClock\n"
        )
        emit(bench_fleet.table(fleet))
    if trains:
        emit(
            f"\nBehaviour-cloning updates, {args.pretrain_steps} per jitted block, median of {args.reps}; "
            "compile = lower+compile of the block\n"
        )
        emit(pretrain_table(trains))
    if not args.no_sim:
        emit(
            f"\nMJX, {args.steps} control steps per call, median of {args.reps} interleaved reps; "
            "ratio = ours/raw physics steps/s; compile = lower+compile; "
            "one untimed warm-up call each\n"
        )
        emit(mjx_table(rows))
        emit(f"\nC twin, operator driving, {args.twin_steps} control steps, median of {args.reps}\n")
        emit(twin_table(twins))
        emit(f"\nverified batch sizes (all calls returned): {sorted(set(args.batches))}; wall {wall:.0f} s")
    if args.latency:
        emit(
            f"\nPolicy latency, one observation (batch 1), {args.latency_calls} interleaved calls each "
            f"after {LATENCY_WARMUP} untimed; JAX: jitted, compile excluded, block_until_ready; numpy: "
            f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}\n"
        )
        emit(latency_table(latency))
        default = latency["state (default)"]
        ratio, p99_ms = default["numpy_p50_over_stream"], default["numpy_p99_us"] / 1e3
        emit(
            f"\nmemory bandwidth, one thread: {default['bandwidth_gb_s']:.1f} GB/s (float32 dot of two "
            f"{STREAM_BYTES >> 20} MiB arrays, best of 5)"
        )
        emit(
            f"default model targets: numpy p50 <= {CLIENT_BOUND}x its weights streamed once from memory: "
            f"{default['numpy_p50_us']:.0f} us against a bound of {default['bound_us']:.0f} us = "
            f"{ratio:.2f}x the stream ({'met' if ratio <= CLIENT_BOUND else 'missed'}); p99 <= 2 ms: "
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
        emit(learner_table(learner))
        if "draw_steps_per_s" in learner.get("draw_flashbax", {}):
            ours, theirs = learner["draw_ours"], learner["draw_flashbax"]
            emit(
                f"\nFused sample alone ({DRAW_STEPS} train steps' batches per jitted call, median of "
                f"{args.reps} alternating reps): ours {ours['draw_steps_per_s']:,.0f}, flashbax "
                f"{theirs['draw_steps_per_s']:,.0f} train steps' batches/s"
            )
        r = learner["replay"]
        emit(
            f"\nReplay, capacity {r['capacity']:,} ({r['bytes'] / 2**20:.0f} MiB ours); add: "
            f"[{BLOCK_ROWS}, {BLOCK_STEPS}] blocks, median call; sample: batch {r['batch']}, n-step "
            f"{r['n_step']}, chunk {r['chunk']}, {r['sample_calls']} calls per rep, median of "
            f"{args.reps}\n"
        )
        emit(replay_table(r))
        emit()
        emit(ratio_lines(learner["ratios"]))
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
        ratios = ratios_table(rows, latency, learner)
        header = [title, "", machine_line(info, wall), "", "## Ratios against the peers", "", ratios, ""]
        (args.report / "report.md").write_text("\n".join(header + lines) + "\n")
        print(f"\nwrote {args.report / 'report.md'} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
