"""The replay section: add and sample items per second, our sharded replay against flashbax's."""

import functools
import importlib.util
import statistics
import time

import jax
import jax.numpy as jnp

import configs
from learner import patch
from learner import replay
from learner import sharding
from tools.bench import flashbax_peer
from tools.bench.blocks import BLOCK_ROWS
from tools.bench.blocks import BLOCK_STEPS
from tools.bench.blocks import random_block
from tools.bench.measure import PEER_MISSING
from tools.bench.measure import CacheEvents
from tools.bench.measure import alternating
from tools.bench.measure import watchdog

SAMPLE_CALLS = 50  # back-to-back sample calls per timed repetition


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
    length = flashbax_peer.fbx_sequence_length(mc.chunk, mc.chunk)
    block_items = BLOCK_ROWS * BLOCK_STEPS
    blocks = [jax.jit(random_block, static_argnums=1)(jax.random.key(i), mc) for i in range(4)]
    fbx_blocks = [{k: b[k] for k in flashbax_peer.FBX_FIELDS} for b in blocks]
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
        fbx = flashbax_peer.fbx_buffer(capacity, sc.batch_size, length)
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
        as_batch = functools.partial(
            flashbax_peer.fbx_transitions, n_step=mc.chunk, chunk=mc.chunk, gamma=sc.gamma
        )
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
