"""`jaxvla bench --updates`: PRO and Recap update throughput, on the data path `jaxvla pro train` and
`jaxvla recap` run.

Both are timed on the same fake episodes (random observations, events and outcomes, default model and
network sizes): PRO's jitted block of updates, and one Recap policy fit (its jitted blocks and the per-fit
set-up). Compile is excluded (one untimed call first); every timer stops after `block_until_ready`; the
median of the repetitions is reported.
"""

import dataclasses
import time

import jax
import numpy as np
from flax import nnx

import configs
from envs.cell import EVENTS
from jaxvla import normalization
from learner import bc
from learner import pro
from learner import recap
from learner import replay
from learner import sharding
from learner.pretrain import Prior

EPISODES, LENGTH = 64, 80  # fake episodes per data set, steps each


def fake_episodes(model, count: int, length: int, seed: int = 0) -> list[dict]:
    """RLDS-like episodes with random observations, actions, events and outcomes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        obs = jax.device_get(model.fake_observation(jax.random.key(seed * 10_000 + i), length))
        success = bool(rng.random() < 0.7)
        out.append(
            {
                "steps": {
                    "observation": obs,
                    "action": rng.uniform(-1, 1, (length, model.action_size)).astype(np.float32),
                    "reward": (np.arange(length) == length - 1).astype(np.float32) * success,
                    "events": rng.random((length, len(EVENTS))) < 0.02,
                    "failure_mode": np.zeros(length, np.int32),
                    "is_first": np.arange(length) == 0,
                    "is_last": np.arange(length) == length - 1,
                    "is_intervention": np.zeros(length, bool),
                },
                "episode_metadata": {
                    "success": success,
                    "retries": int(rng.integers(0, 3)),
                    "cycle_time": length / 10.0,
                    "episode_id": f"bench-{seed}-{i}",
                    "policy_version": "0",
                },
            }
        )
    return out


def timed(fn, reps: int) -> float:
    """Median seconds of `reps` calls of fn() after one untimed call (the compile)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_pro(config: configs.Config, steps: int, reps: int) -> dict:
    """PRO updates per second: `steps` updates per jitted block, as `jaxvla pro train` runs them."""
    pc = dataclasses.replace(config.pro, log_every=steps, steps=steps)
    mesh = sharding.make_mesh()
    episodes = fake_episodes(config.model, EPISODES, LENGTH)
    stats = normalization.compute(
        {
            k: np.concatenate([ep["steps"]["observation"][k] for ep in episodes])
            for k in episodes[0]["steps"]["observation"]
        }
    )
    buffer = pro.fill_replay(episodes, pc, mesh)
    graphdef, params = nnx.split(pc.net.create(0), nnx.Param)
    optimizer = bc.make_optimizer(pc.optimizer.learning_rate, 1000, 10, pc.optimizer.weight_decay)
    train = pro.make_train_steps(graphdef, stats, optimizer, pc, mesh)
    holder = {"state": jax.device_put(bc.init_state(params, optimizer), sharding.replicated(mesh))}
    key = jax.random.key(0)

    def call():
        holder["state"], metrics = train(holder["state"], buffer, key)  # the state is donated
        return metrics

    seconds = timed(call, reps)
    return {
        "batch": pc.batch_size,
        "window": pc.net.window,
        "steps_per_call": steps,
        "devices": mesh.size,
        "steps_per_s": steps / seconds,
        "windows_per_s": steps * pc.batch_size / seconds,
    }


def bench_recap(config: configs.Config, steps: int, reps: int) -> dict:
    """Recap policy updates per second: one policy fit of `steps` updates (its blocks and its set-up)."""
    config = dataclasses.replace(config, recap=dataclasses.replace(config.recap, policy_steps=steps))
    mc, rc = config.model, config.recap
    mesh = sharding.make_mesh()
    graphdef, params = nnx.split(mc.create_policy(0), nnx.Param)
    demos = fake_episodes(mc, EPISODES, LENGTH, seed=1)
    stats = normalization.compute(
        {
            k: np.concatenate([ep["steps"]["observation"][k] for ep in demos])
            for k in demos[0]["steps"]["observation"]
        }
    )
    prior = Prior(mc, "bench", graphdef, params, stats, 0, None)
    policy_graphdef, policy_init = recap.conditioned_policy(prior)
    ratios = recap.batch_ratios(recap.source_shares(rc, demonstrations=True), rc.batch_size, mesh.size)
    fit = recap.make_policy_fit(config, prior, policy_graphdef, mesh, ratios)
    buffers = recap_buffers(config, demos, fake_episodes(mc, EPISODES, LENGTH, seed=2), mesh)
    seconds = timed(lambda: fit(policy_init, buffers, 0)[0], reps)
    return {
        "batch": rc.batch_size,
        "steps_per_call": steps,
        "devices": mesh.size,
        "steps_per_s": steps / seconds,
        "examples_per_s": steps * rc.batch_size / seconds,
    }


def recap_buffers(config: configs.Config, demos: list[dict], collected: list[dict], mesh) -> dict:
    """The replay `recap.run_recap` trains from: the demonstrations, and the collected episodes split
    between the autonomous and the corrected sources."""
    mc, rc = config.model, config.recap
    targets = recap.Targets(LENGTH, rc.c_fail, rc.advantage_steps, mc.value_range)
    keys = tuple(mc.observation_spec(1))
    half = len(collected) // 2
    buffers = {}
    for name, episodes in (
        (recap.DEMONSTRATIONS, demos),
        (recap.AUTONOMOUS, collected[:half]),
        (recap.CORRECTED, collected[half:]),
    ):
        block = replay.from_episodes(episodes, rows=len(episodes), obs_keys=keys)
        block = recap.recap_block(block, [ep["episode_metadata"]["success"] for ep in episodes], targets)
        spec = {k: jax.ShapeDtypeStruct(v.shape[2:], v.dtype) for k, v in block["obs"].items()}
        buffer = replay.create(
            spec, mc.action_size, block["valid"].size, mesh, recap.extras_spec(), n_step=mc.chunk
        )
        buffers[name] = replay.insert(buffer, block, source=replay.SOURCES.index(name))
    return buffers


def run(steps: int, reps: int) -> dict:
    config = configs.get_config("default")
    return {"pro": bench_pro(config, steps, reps), "recap_policy": bench_recap(config, steps, reps)}


def table(result: dict) -> str:
    p, r = result["pro"], result["recap_policy"]
    return "\n".join(
        [
            "| update | batch | devices | updates/s | examples/s |",
            "|---|---:|---:|---:|---:|",
            f"| PRO (window {p['window']}) | {p['batch']} | {p['devices']} | {p['steps_per_s']:.2f} | "
            f"{p['windows_per_s']:,.0f} |",
            f"| Recap policy fit | {r['batch']} | {r['devices']} | {r['steps_per_s']:.2f} | "
            f"{r['examples_per_s']:,.0f} |",
        ]
    )
