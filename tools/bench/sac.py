"""The learner section: SAC train steps per second on one device, fused (batches from our replay, or from
flashbax's, drawn inside the jit), unfused (jitted calls from a Python loop) and PyTorch eager."""

import dataclasses
import functools
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import configs
from jaxvla import models
from jaxvla import normalization
from learner import patch
from learner import replay
from learner import sac
from learner import sharding
from tools.bench import flashbax_peer
from tools.bench import torch_workers
from tools.bench.blocks import BLOCK_ROWS
from tools.bench.blocks import BLOCK_STEPS
from tools.bench.blocks import random_block
from tools.bench.measure import PEER_MISSING
from tools.bench.measure import CacheEvents
from tools.bench.measure import alternating
from tools.bench.measure import matmul_flops
from tools.bench.measure import watchdog


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
    length = flashbax_peer.fbx_sequence_length(mc.chunk, mc.chunk)
    make_block = jax.jit(functools.partial(random_block, model=mc))
    insert = patch.make_insert()
    fields = flashbax_peer.FBX_FIELDS
    buffers, fbx_buffers, fbx_states = {}, [], []
    with watchdog("learner: fill replay", limit):
        for source, (name, capacity) in enumerate(capacities.items()):
            buffers[name] = replay.create(
                patch.observation_spec(mc), mc.action_size, capacity, mesh, n_step=mc.chunk
            )
            if with_fbx:
                fbx_buffers.append(flashbax_peer.fbx_buffer(capacity, counts[name], length))
                first = jax.tree.map(lambda x: x[0, 0], random_block(jax.random.key(0), mc))
                fbx_states.append(fbx_buffers[-1].init({k: first[k] for k in fields}))
                fbx_add = jax.jit(fbx_buffers[-1].add, donate_argnums=0)
            for i in range(-(-capacity // (BLOCK_ROWS * BLOCK_STEPS))):
                block = make_block(jax.random.fold_in(jax.random.key(source), i))
                buffers[name] = insert(buffers[name], block, source=source)
                if with_fbx:
                    fbx_states[-1] = fbx_add(fbx_states[-1], {k: block[k] for k in fields})
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
        fbx_draw = functools.partial(flashbax_peer.fbx_draw_batches, mixer=mixer, counts=counts)
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

    workers = torch_workers.start_torch(
        torch_workers.torch_spec(mc, sc, counts, capacities, steps, reps), limit
    )
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
    result["torch"] = torch_workers.torch_result(workers)
    return {**result, **draws}


DRAW_STEPS = 20  # train steps' batches drawn per call of the fused-draw programs


def bench_draws(buffers: dict, fbx_states: list, fbx_draw, spec: sac.Spec, reps: int, limit: float) -> dict:
    """The sampling of the fused train step alone: DRAW_STEPS train steps' batches (utd + 1 mixed batches
    each, normalised) per jitted call, ours (`sac.draw_batches`) against flashbax's (`fbx_draw`, a bound
    `flashbax_peer.fbx_draw_batches`), repetitions alternating, medians reported."""
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
