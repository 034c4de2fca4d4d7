"""The simulator section: our MJX workcell against raw `vmap(mjx.step)` on the same models, and the C twin."""

import statistics
import time

import jax
import jax.numpy as jnp
import mujoco
from mujoco import mjx

from envs.twin import Twin
from envs.workcell import Workcell
from tools.bench.measure import CacheEvents
from tools.bench.measure import call_timed
from tools.bench.measure import compile_timed
from tools.bench.measure import watchdog


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
