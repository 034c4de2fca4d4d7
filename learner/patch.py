"""Interactive policy patching (Cortex 1.5) in MJX, and its comparison arm, full SFT retraining.

Patching, one round at a time: the current policy runs a batch of episodes on the split it fails on while
the scripted operator watches; at the first sign of failure (slip, force, a failure event, a stall) the
operator takes over until the task has moved on, then hands back. Every step goes to the online source,
the takeover steps (and the n steps after them, for n-step targets) also to the patch source; the sparse
success the operator verifies is the reward, or with `patch.reward = "pro"` the process-reward model's
dense Δp - λρ (learner/pro.py; the offline demonstrations are relabelled with it too). The SAC learner
then runs its fused updates over the offline (the task's pretraining demonstrations), online and patch
sources, and the new params are evaluated without the operator. Operator effort is counted as corrective
episodes (episodes with any takeover) and takeover steps.

SFT retraining, the seeds' baseline: record full operator demonstrations on the split, then retrain the
prior by behaviour cloning on them plus the same offline demonstrations; the effort is one corrective
episode per demonstration.

A patching run checkpoints the learner state and the replay every round and resumes from the latest
round: rollout and update keys are `fold_in(key, round)`, so a resumed run continues exactly.
"""

import dataclasses
import functools
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import envs
from configs import Config
from envs.rollout import rollout
from envs.wrappers import Takeover
from envs.wrappers import Trigger
from learner import bc
from learner import dataset
from learner import evaluate
from learner import pro
from learner import replay
from learner import sac
from learner import sharding
from learner.checkpoints import Checkpoints
from learner.pretrain import MetricsLog
from learner.pretrain import Prior


# ------------------------------------------------------------------------------------------ rollouts
def episode_block(record: dict, version: int) -> dict:
    """A frozen-after-done rollout record [T, B, ...] -> the replay's insert block [B, T, ...]."""
    ended = record["done"] | record["truncated"]  # [T, B]: the episode ended at step t
    ended_before = jnp.cumsum(ended, axis=0) - ended > 0
    valid = ~ended_before
    rows = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
    steps = valid.shape[0]
    block = {
        "obs": jax.tree.map(rows, record["obs"]),
        "action": rows(record["info"]["action"]),
        "reward": rows(record["reward"]),
        "terminal": rows(ended & valid),
        "valid": rows(valid),
        "is_first": rows(jnp.broadcast_to((jnp.arange(steps) == 0)[:, None], valid.shape)),
        "intervention": rows(record["info"]["is_intervention"] & valid),
        "version": jnp.full(rows(valid).shape, version, jnp.int32),
        "reward_source": jnp.full(rows(valid).shape, replay.OPERATOR_REWARD, jnp.int8),
    }
    return block


def effort(block: dict) -> dict:
    """Operator effort and data volume of one rollout block, as Python numbers."""
    intervened = np.asarray(block["intervention"])
    return {
        "corrective_episodes": int(np.sum(intervened.any(axis=1))),
        "takeover_steps": int(np.sum(intervened)),
        "env_steps": int(np.sum(np.asarray(block["valid"]))),
    }


class Collector:
    """`num_envs` episodes of the policy with the scripted operator ready to take over: one jitted call."""

    def __init__(self, task: str, split: str, num_envs: int, trigger: Trigger, actor: evaluate.Actor,
                 relabel=None):  # fmt: skip
        """`relabel(block, success) -> block` replaces the operator's sparse reward (PRO's dense one). It is
        jitted on its own, so the rollout program is the same with or without it (compiled once, cached)."""
        self.env = Takeover(envs.make(task, split), trigger)
        self.num_envs, self.length = num_envs, self.env.config.max_steps
        reset, step = jax.vmap(self.env.reset), jax.vmap(self.env.step)

        def run(params, key, version):
            key_reset, key_act = jax.random.split(key)
            state = reset(jax.random.split(key_reset, num_envs))
            last, record = rollout(step, lambda s, k: actor(params, s.obs, k), state, key_act, self.length)
            return episode_block(record, version), last.info["success"]

        self._run = jax.jit(run)
        self._relabel = jax.jit(relabel) if relabel is not None else None

    def __call__(self, params, key: jax.Array, version: int) -> tuple[dict, jax.Array]:
        block, success = self._run(params, key, jnp.int32(version))
        return (block if self._relabel is None else self._relabel(block, success)), success


# ------------------------------------------------------------------------------------------ patching
@dataclasses.dataclass
class Learner:
    """Everything a patching run updates between rounds; `checkpointed` is what orbax saves."""

    state: sac.SACState
    buffers: dict
    round: int
    totals: dict

    def checkpointed(self) -> dict:
        return {"sac": self.state, "replay": self.buffers}


def make_insert():
    """`replay.insert` jitted with the buffer donated (online and patch blocks go through it)."""
    return jax.jit(
        replay.insert, static_argnames=("source", "n_step", "interventions_only"), donate_argnums=0
    )


def insert_experience(insert, buffers: dict, block: dict, chunk: int) -> dict:
    """Every step of `block` into the online source, takeover steps (and the n after) into patch."""
    buffers = dict(buffers)
    for name, only in (("online", False), ("patch", True)):
        buffers[name] = insert(buffers[name], block, source=replay.SOURCES.index(name), n_step=chunk,
                               interventions_only=only)  # fmt: skip
    return buffers


def trigger_of(config: Config) -> Trigger:
    pc = config.patch
    return Trigger(slip=pc.slip, force=pc.force, stall_steps=pc.stall_steps, disagreement=pc.disagreement)


def observation_spec(model) -> dict:
    """One step's observation shapes, as the replay stores them."""
    return {k: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for k, s in model.observation_spec(1).items()}


def new_learner(config: Config, prior: Prior, offline: list[dict], mesh, seed: int) -> Learner:
    pc, sc, mc = config.patch, config.sac, prior.config.model
    replicated = sharding.replicated(mesh)
    _, critic = nnx.split(mc.create_critic(seed + 1), nnx.Param)
    optimizers = sac.make_optimizers(sc)
    actor = jax.tree.map(jnp.copy, prior.params)  # the learner's state is donated; the prior stays intact
    state = sac.init_state(actor, critic, sc.init_alpha, actor_opt=optimizers["actor"],
                           critic_opt=optimizers["critic"], alpha_opt=optimizers["alpha"])  # fmt: skip
    spec = observation_spec(mc)
    buffers = {
        name: replay.create(spec, mc.action_size, capacity, mesh)
        for name, capacity in zip(replay.SOURCES, pc.capacity, strict=True)
    }
    if offline:
        rows = mesh.size * max(1, len(offline) // (4 * mesh.size))
        block = replay.from_episodes(offline, rows=rows)
        buffers["offline"] = replay.insert(
            buffers["offline"], block, source=replay.SOURCES.index("offline"), n_step=mc.chunk
        )
    totals = {"corrective_episodes": 0, "takeover_steps": 0, "env_steps": 0, "wall_s": 0.0}
    return Learner(jax.device_put(state, replicated), buffers, 0, totals)


def critic_graphdef(model) -> nnx.GraphDef:
    return nnx.split(model.create_critic(0), nnx.Param)[0]


def run_patching(config: Config, prior: Prior, offline: list[dict], run_dir: pathlib.Path, *, seed: int,
                 mesh=None, progress: bool = True) -> tuple[list[dict], nnx.State]:  # fmt: skip
    """Patches `prior` on `config.patch.task`/`split`: one record per round (round 0 is the prior) and the
    patched policy's params.

    Resumes from `run_dir/checkpoints` if a previous run left one.
    """
    pc, sc, mc = config.patch, config.sac, prior.config.model
    mesh = mesh or sharding.make_mesh()
    # Fail now, not after minutes of compiling (make_train_steps below checks the batch and its mix).
    if pc.envs_per_round % mesh.size:
        raise ValueError(f"patch.envs_per_round={pc.envs_per_round} must be a multiple of the {mesh.size} "
                         "devices: each device's replay shard takes whole episodes")  # fmt: skip
    nets = sac.Networks(actor=prior.graphdef, critic=critic_graphdef(mc), stats=prior.stats)
    train_block = sac.make_train_steps(sc, mc, nets, sac.make_optimizers(sc), num_steps=pc.updates_per_round,
                                       mesh=mesh)  # fmt: skip
    explore = evaluate.chunk_actor(prior.graphdef, prior.stats, explore=pc.explore)
    relabel = None
    if pc.reward == "pro":
        rewards = {"gamma": sc.gamma, "risk_weight": config.pro.risk_weight,
                   "failure_cost": config.pro.failure_cost}  # fmt: skip
        model = pro.load(pc.pro)
        relabel = functools.partial(pro.relabel, model, **rewards)
        offline = pro.relabel_episodes(model, offline, **rewards)
    collector = Collector(pc.task, pc.split, pc.envs_per_round, trigger_of(config), explore, relabel)
    evaluator = evaluate.Evaluator(
        pc.task, pc.split, pc.eval_episodes, evaluate.chunk_actor(prior.graphdef, prior.stats)
    )
    insert_online = make_insert()

    learner = new_learner(config, prior, offline, mesh, seed)
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=2)
    log = MetricsLog(run_dir / "metrics.jsonl")
    records = []
    if checkpoints.latest_step() is not None:
        saved, meta = checkpoints.restore(learner.checkpointed())
        learner = Learner(saved["sac"], saved["replay"], meta["round"], meta["totals"])
        records = meta["records"]
        print(f"resumed {run_dir} after round {learner.round}")
    key = jax.random.key(seed)
    key_roll, key_train, key_eval = jax.random.split(key, 3)

    def evaluation(round_: int) -> dict:
        report = evaluate.summarize(evaluator(learner.state.actor, jax.random.fold_in(key_eval, round_)))
        return {"kind": "patch", "round": round_, **learner.totals, **report}

    if not records:
        records.append(evaluation(0))
        log.write(records[-1])
    bar = tqdm(total=pc.rounds, initial=learner.round, desc=f"patch {pc.task}/{pc.split}", unit="round",
               disable=not progress)  # fmt: skip
    while learner.round < pc.rounds:
        tic = time.perf_counter()
        round_ = learner.round + 1
        block, helped = collector(learner.state.actor, jax.random.fold_in(key_roll, round_), round_)
        buffers = insert_experience(insert_online, learner.buffers, block, mc.chunk)
        state, metrics = train_block(learner.state, buffers, jax.random.fold_in(key_train, round_))
        jax.block_until_ready(state)
        totals = {k: learner.totals[k] + v for k, v in effort(block).items()}
        learner = Learner(state, buffers, round_, totals)
        learner.totals["wall_s"] = records[-1]["wall_s"] + time.perf_counter() - tic
        record = evaluation(round_)
        record.update(assisted_success=float(np.mean(np.asarray(helped))),
                      **{k: float(v) for k, v in jax.device_get(metrics).items()})  # fmt: skip
        records.append(record)
        log.write(record)
        checkpoints.save(round_, learner.checkpointed(), {"round": round_, "totals": learner.totals,
                                                          "records": records})  # fmt: skip
        bar.update(1)
        bar.set_postfix(success=f"{record['success_rate']:.0%}", corrective=totals["corrective_episodes"])
    bar.close()
    checkpoints.close()
    return records, learner.state.actor


# ----------------------------------------------------------------------------------------------- SFT
def sft_retrain(config: Config, prior: Prior, episodes: list[dict], *, seed: int, mesh=None) -> nnx.State:
    """The prior retrained by BC on `episodes` for `config.patch.sft_steps` steps (pretraining's
    optimiser settings); the prior's params are left intact."""
    pc, pre, mc = config.patch, config.pretrain, prior.config.model
    mesh = mesh or sharding.make_mesh()
    block = pre.log_every
    steps = pc.sft_steps - pc.sft_steps % block
    data = jax.device_put(dataset.flatten(episodes, mc.chunk), sharding.replicated(mesh))
    optimizer = bc.make_optimizer(pre.learning_rate, steps, min(pre.warmup_steps, steps // 10),
                                  pre.weight_decay)  # fmt: skip
    params = jax.tree.map(jnp.copy, prior.params)  # donated by the train step
    state = jax.device_put(bc.init_state(params, optimizer), sharding.replicated(mesh))
    train = bc.make_train_steps(
        prior.graphdef, prior.stats, optimizer, num_steps=block, batch_size=pre.batch_size,
        nll_weight=pre.nll_weight, mesh=mesh,
    )  # fmt: skip
    key = jax.random.key(seed)
    for _ in range(steps // block):
        state, _ = train(state, data, key)
    return state.params


def run_sft(config: Config, prior: Prior, demos: list[dict], offline: list[dict], *, seed: int, mesh=None,
            progress: bool = True) -> list[dict]:  # fmt: skip
    """Full SFT retraining from the prior, once per count in `config.patch.sft_demos` (first N demos)."""
    pc = config.patch
    evaluator = evaluate.Evaluator(
        pc.task, pc.split, pc.eval_episodes, evaluate.chunk_actor(prior.graphdef, prior.stats)
    )
    records = []
    for count in tqdm(pc.sft_demos, desc=f"SFT {pc.task}/{pc.split}", unit="retrain", disable=not progress):
        tic = time.perf_counter()
        params = sft_retrain(config, prior, demos[:count] + offline, seed=seed, mesh=mesh)
        report = evaluate.summarize(evaluator(params, jax.random.key(seed + 1)))
        used = demos[:count]
        records.append({
            "kind": "sft", "demos": count, "corrective_episodes": count,
            "takeover_steps": int(sum(len(ep["steps"]["action"]) for ep in used)),
            "env_steps": int(sum(len(ep["steps"]["action"]) for ep in used)),
            "wall_s": time.perf_counter() - tic, **report,
        })  # fmt: skip
    return records


def save_json(path: pathlib.Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
