"""Scripted-operator demonstrations in the MJX workcell, as RLDS episodes (`jaxvla.episodes`).

Each batch of `num_envs` episodes is one jitted, vmapped `envs.rollout.rollout` scan of the task's full
episode length; each env's record is then cut at its first done or truncated step. Actuation noise
(DART): the env executes clip(command + N(0, noise^2), -1, 1) while the episode records the operator's
command, as a real robot's log records commands and the noise plays actuation error. Pushes: with
probability `bursts` per step, the next BURST_STEPS steps execute random moves (the valve still follows
the operator), knocking the cup centimetres off its path; the operator's recovery commands are what a
cloned policy needs to see once its own errors compound. Neither is applied while the cup drags a lid.

`generate(...)` returns episodes; `load_or_generate(...)` reads a dataset folder and tops it up first.
`jaxvla data generate` (tools/data.py) is the command over them.
"""

import functools
import math
import uuid
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from envs import cell
from envs.rollout import rollout
from envs.workcell import Workcell
from jaxvla import episodes as rlds
from jaxvla import tokenizer
from jaxvla.schema import ACTION_SIZE

METADATA = {"robot_id": "sim-0", "policy_version": "operator", "source": "offline"}
# Action units are fractions of v_max per control step: sigma 0.1 jitters the setpoint by 8 mm a step,
# twice the operator's 4 mm alignment tolerance, and no grasp succeeds. Operator success measured over
# 16-32 episodes: pick_place/train 100% at 0, 97% at 0.02, 91% at 0.03, 56% at 0.05, 0% at 0.1;
# sort/train 94% and pick_place/novel 100% at 0.02. unbox (dragging the lid) suffers from any noise:
# 66% at 0.005, 31% at 0.02.
NOISE = 0.02
# Pushes: random xyz moves of up to BURST_SCALE action units (4 cm) for BURST_STEPS steps.
BURSTS, BURST_STEPS, BURST_SCALE = 0.03, 3, 0.5


def burst_schedule(key: jax.Array, num_envs: int, steps: int, rate) -> jax.Array:
    """[B, T] bool: the steps inside a push; a push starting at t covers t .. t + BURST_STEPS - 1."""
    starts = jax.random.uniform(key, (num_envs, steps)) < rate
    shifted = [jnp.pad(starts, ((0, 0), (k, 0)))[:, :steps] for k in range(BURST_STEPS)]
    return jnp.any(jnp.stack(shifted), axis=0)


@functools.cache
def operator_batch(task: str, split: str, num_envs: int):
    """(key, noise, bursts) -> record of `num_envs` noisy operator episodes, leaves [T, B, ...]; jitted once.

    The scanned policy emits [command, actuated] ([B, 8]) and the step executes the second half, so the
    record's `action` keeps both. Its other entries are rollout's: obs, reward, done, truncated, info.
    `noise` and `bursts` are arguments, not constants, so one compile serves every level.
    """
    env = Workcell(task, split)
    steps = env.config.max_steps

    def run(key, noise, bursts):
        key_reset, key_run, key_bursts = jax.random.split(key, 3)
        pushed = burst_schedule(key_bursts, num_envs, steps, bursts)

        def policy(states, key_t):
            command = jax.vmap(env.operator_action)(states)  # [B, 4]
            key_noise, key_push = jax.random.split(key_t)
            actuated = jnp.clip(command + noise * jax.random.normal(key_noise, command.shape), -1.0, 1.0)
            push = jax.random.uniform(key_push, (num_envs, 3), minval=-BURST_SCALE, maxval=BURST_SCALE)
            in_push = pushed[jnp.arange(num_envs), jnp.minimum(states.cell.step, steps - 1)]
            actuated = actuated.at[:, :3].set(jnp.where(in_push[:, None], push, actuated[:, :3]))
            # Dragging a lid is left unperturbed: noise there tears the handle's seal (a lid slip) rather
            # than showing a recovery, and 0.02 of it cut unbox's operator success to 31%.
            actuated = jnp.where((states.cell.grip == cell.GRIP_LID)[:, None], command, actuated)
            return jnp.concatenate([command, actuated], axis=-1)

        def step(states, both):
            return jax.vmap(env.step)(states, both[:, ACTION_SIZE:])

        states = jax.vmap(env.reset)(jax.random.split(key_reset, num_envs))
        return rollout(step, policy, states, key_run, steps)[1]

    return jax.jit(run)


def to_episodes(record: dict, task: str) -> list[dict]:
    """One RLDS episode per env of a batch record (numpy leaves [T, B, ...]), each cut where it ended."""
    return [to_episode(r, task) for r in env_records(record)]


def env_records(record: dict) -> list[dict]:
    """A batch record (numpy leaves [T, B, ...]) split per env, each cut at the step its episode ended."""
    ended = record["done"] | record["truncated"]  # [T, B]
    lengths = np.where(ended.any(axis=0), ended.argmax(axis=0) + 1, len(ended))  # [B]
    return [env_record(record, b, n) for b, n in enumerate(lengths)]


def env_record(record: dict, b: int, n: int) -> dict:
    """Env b's first n steps of a batch record: leaves [T, B, ...] -> [n, ...]."""
    return jax.tree.map(lambda x: x[:n, b], record)


def to_episode(record: dict, task: str) -> dict:
    """One env's record (numpy leaves [T, ...], ending at its last step) as an operator episode."""
    command = record["action"][:, :ACTION_SIZE]  # the executed, noisy half is not kept
    n = len(command)
    return episode_from_record(
        record,
        task,
        action=command,
        policy_action=command.copy(),
        is_intervention=np.ones(n, bool),
        metadata=METADATA,
    )


def episode_from_record(
    record: dict,
    task: str,
    *,
    action: np.ndarray,
    policy_action: np.ndarray,
    is_intervention: np.ndarray,
    metadata: dict,
) -> dict:
    """One env's rollout record (numpy leaves [T, ...], ending at its last step) as an RLDS episode;
    `metadata` gives robot_id, policy_version and source."""
    n = len(record["reward"])
    terminal = record["done"] & ~record["truncated"]
    info = record["info"]
    last = {k: info[k][-1] for k in ("success", "retries", "cycle_time")}
    steps = {
        "observation": record["obs"],
        "action": action,
        "policy_action": policy_action,
        "reward": record["reward"],
        "discount": np.where(terminal, 0.0, 1.0).astype(np.float32),
        "is_first": np.arange(n) == 0,
        "is_last": np.arange(n) == n - 1,
        "is_terminal": terminal,
        "is_intervention": is_intervention,
        "failure_mode": info["failure_mode"],
        "events": info["events"],
    }
    meta = {
        "episode_id": str(uuid.uuid4()),
        "task": task,
        "prompt": tokenizer.decode(record["obs"]["prompt"][0]),
        "success": bool(last["success"]),
        "operator_reward": float(last["success"]),
        "retries": int(last["retries"]),
        "cycle_time": float(last["cycle_time"]),
        **metadata,
    }
    return {"steps": steps, "episode_metadata": meta}


def generate(
    task: str,
    split: str,
    episodes: int,
    *,
    num_envs: int = 64,
    seed: int = 0,
    noise: float = NOISE,
    bursts: float = BURSTS,
    progress: bool = False,
) -> list[dict]:
    """`episodes` noisy scripted-operator episodes of `task` on `split`, in the `jaxvla.episodes` schema.

    Runs ceil(episodes / B) batches of B = min(num_envs, episodes) envs, batch i from fold_in(key(seed), i),
    and drops the surplus of the last batch. The first batch includes the compile (10-25 s).
    """
    if episodes < 1 or num_envs < 1 or noise < 0 or not 0 <= bursts <= 1:
        raise ValueError(
            f"need episodes >= 1, num_envs >= 1, noise >= 0, 0 <= bursts <= 1; "
            f"got {episodes}, {num_envs}, {noise}, {bursts}"
        )
    batch = min(num_envs, episodes)
    run = operator_batch(task, split, batch)
    key = jax.random.key(seed)
    out = []
    for i in tqdm(range(math.ceil(episodes / batch)), desc="batches", unit="batch", disable=not progress):
        record = jax.device_get(run(jax.random.fold_in(key, i), jnp.float32(noise), jnp.float32(bursts)))
        out.extend(to_episodes(record, task))
    return out[:episodes]


def load_or_generate(
    data_dir: str | Path,
    task: str,
    split: str,
    episodes: int,
    *,
    seed: int = 0,
    noise: float = NOISE,
    bursts: float = BURSTS,
) -> list[dict]:
    """The first `episodes` demonstrations of `<data_dir>/<task>_<split>`, generated (and written) first
    when the dataset holds fewer."""
    directory = Path(data_dir) / f"{task}_{split}"
    found = rlds.read_episodes(directory) if directory.exists() else []
    if len(found) < episodes:
        print(f"{directory}: {len(found)} episodes, need {episodes}; generating them")
        found = generate(
            task,
            split,
            episodes,
            num_envs=min(episodes, 128),
            seed=seed,
            noise=noise,
            bursts=bursts,
            progress=True,
        )
        rlds.write_episodes(directory, found, overwrite=True)
    return found[:episodes]
