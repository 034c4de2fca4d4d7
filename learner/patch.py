"""Interactive policy patching (Cortex 1.5) in MJX, and the baselines it is measured against.

Patching, one round at a time: the current policy runs a batch of episodes on the deployment split while
the scripted operator watches. At a sign of failure (slip, force, a failure event, a stall; optionally a
look-ahead) the operator takes over for a segment and hands back once the situation is calm, the task has
moved on, or the segment hits its cap (`envs.operator.Trigger`). Every step goes to the online source, the
takeover steps (and the n steps after them, for n-step targets) also to the patch source; the sparse
success the operator verifies is the reward, or with `patch.reward = "pro"` the process-reward model's
dense one (learner/pro.py; the offline demonstrations are relabelled with it too; with `pro.refresh_steps`
PRO is first fine-tuned on each round's own episodes). The SAC learner then
runs its fused updates over the offline (the task's pretraining demonstrations), online and patch sources.
By default (`patch.base`) the residual acts on a base that is itself retrained each round, HG-DAgger's
way: BC from the prior on the offline demonstrations and every takeover step so far; the critic then
chooses between that base's action and the patched one (IBRL).

Operator effort is counted as corrective episodes, takeover segments and operator steps. The same
contexts are replayed without the operator, so a takeover in an episode the policy would have won alone
counts as a false alarm.

Every arm is scored the same way (`PairedEvaluation`): the fixed test contexts for the headline and the
disjoint validation contexts for "effort to reach the goal". The baselines:
- full SFT retraining: BC from the prior on full operator demonstrations of the split (the seeds' baseline);
- targeted SFT: the same on demonstrations of the split's tail components only;
- HG-DAgger: the BC policy runs under the same operator triggers; BC from the prior on every takeover step
  gathered so far.

A patching run checkpoints the learner state and the replay every round and resumes from the latest
round: rollout and update keys are `fold_in(key, round)`, so a resumed run continues exactly.
"""

import dataclasses
import functools
import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

import envs
from configs import Config
from envs import demos as operator_demos
from envs.rollout import rollout
from envs.wrappers import Takeover
from envs.wrappers import Trigger
from jaxvla import normalization
from learner import bc
from learner import compile_cache
from learner import dataset
from learner import evaluate
from learner import pro
from learner import replay
from learner import residual
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


def takeover_segments(intervention: np.ndarray) -> list[int]:
    """intervention [B, T] bool -> the length of every takeover segment (a run of operator steps)."""
    flags = np.asarray(intervention, bool)
    padded = np.pad(flags, ((0, 0), (1, 1))).astype(np.int8)
    edges = np.diff(padded, axis=1)  # +1 where a segment starts, -1 one past where it ends
    starts, ends = np.nonzero(edges == 1), np.nonzero(edges == -1)
    return (ends[1] - starts[1]).tolist()  # row-major order pairs each start with its end


def effort(block: dict, solo_success=None) -> dict:
    """Operator effort and data volume of one rollout block, as Python numbers. With `solo_success` [B]
    (the same contexts replayed without the operator), false alarms: corrective episodes the policy would
    have won alone."""
    intervened = np.asarray(block["intervention"])
    corrective = intervened.any(axis=1)
    counts = {
        "corrective_episodes": int(np.sum(corrective)),
        "takeover_segments": len(takeover_segments(intervened)),
        "takeover_steps": int(np.sum(intervened)),
        "env_steps": int(np.sum(np.asarray(block["valid"]))),
    }
    if solo_success is not None:
        counts["false_alarms"] = int(np.sum(corrective & np.asarray(solo_success, bool)))
    return counts


def intervention_examples(block: dict, chunk: int) -> dict[str, np.ndarray]:
    """HG-DAgger's data: every operator step of a rollout block as a BC example, its label the operator's
    chunk a[t : t + H] with the entries the operator did not execute masked out. Same layout as
    `dataset.flatten`."""
    block = jax.device_get(block)
    operator = np.asarray(block["intervention"], bool) & np.asarray(block["valid"], bool)  # [B, T]
    steps = operator.shape[1]
    index = np.arange(steps)[:, None] + np.arange(chunk)[None, :]  # [T, H]
    inside = index < steps
    index = np.minimum(index, steps - 1)
    chunks = block["action"][:, index]  # [B, T, H, A]
    mask = operator[:, index] & inside[None]  # [B, T, H]
    rows = np.nonzero(operator)
    return {
        "obs": {k: np.asarray(v)[rows] for k, v in block["obs"].items()},
        "chunk": np.asarray(chunks[rows], np.float32),
        "mask": mask[rows],
    }


class Collector:
    """`num_envs` episodes of the policy with the scripted operator ready to take over: one jitted call.

    With `solo`, the same contexts (reset and action keys) also run without the operator, which tells a
    needed takeover from a false alarm. A look-ahead trigger rolls `lookahead_actor` (the deterministic
    policy) ahead from every state.
    """

    def __init__(
        self,
        task: str,
        split: str,
        num_envs: int,
        trigger: Trigger,
        actor: evaluate.Actor,
        *,
        solo: bool = False,
        lookahead_actor: evaluate.Actor | None = None,
        takeover=Takeover,
        keep_record: bool = False,
    ):
        """`takeover(env, trigger, policy=...)` wraps the env (PRO's risk trigger: `pro.risk_takeover`).
        `keep_record`: also return the raw rollout record [T, B] (`pro.rollout_episodes` makes RLDS episodes
        of it, for PRO's on-policy refresh)."""
        if trigger.lookahead and lookahead_actor is None:
            raise ValueError("a look-ahead trigger needs the deterministic policy (lookahead_actor)")
        base = envs.make(task, split)
        self.num_envs, self.length = num_envs, base.config.max_steps

        def run(params, key, version):
            one = lambda s: lookahead_actor(params, jax.tree.map(lambda x: x[None], s.obs), key)[0]  # noqa: E731
            env = takeover(base, trigger, policy=one if trigger.lookahead else None)
            policy = lambda s, k: actor(params, s.obs, k)  # noqa: E731
            key_reset, key_act = jax.random.split(key)
            keys = evaluate.reset_keys(key_reset, num_envs)  # the contexts an Evaluator under `key` runs
            last, record = rollout(
                jax.vmap(env.step), policy, jax.vmap(env.reset)(keys), key_act, self.length
            )
            out = {
                "block": episode_block(record, version),
                "success": last.info["success"],
                "component": last.params.component,
            }
            if keep_record:
                out["record"] = record
            if solo:
                alone, _ = rollout(
                    jax.vmap(base.step), policy, jax.vmap(base.reset)(keys), key_act, self.length
                )
                out["solo_success"] = alone.info["success"]
            return out

        self._run = jax.jit(run)

    def __call__(self, params, key: jax.Array, version: int) -> dict:
        """{"block": the replay's insert block, "success": [B], "component": [B], "solo_success": [B],
        "record": [T, B] leaves}."""
        return self._run(evaluate.on_host(params), key, jnp.int32(version))


def protocol_report(rolled: dict, components: tuple[str, ...]) -> dict:
    """The operator protocol on one batch of contexts (a `Collector` output with `solo`): success with the
    operator and without, effort, false alarms and segment lengths, overall and per component."""
    block = jax.device_get(rolled["block"])
    success, solo = np.asarray(rolled["success"], bool), np.asarray(rolled["solo_success"], bool)
    component = np.asarray(rolled["component"])

    def figures(rows: np.ndarray) -> dict:
        part = {k: block[k][rows] for k in ("intervention", "valid")}
        counts = effort(part, solo[rows])
        segments = takeover_segments(part["intervention"])
        return {
            "episodes": int(np.sum(rows)),
            "assisted_success": float(np.mean(success[rows])) if rows.any() else None,
            "solo_success": float(np.mean(solo[rows])) if rows.any() else None,
            **counts,
            "false_alarm_rate": false_alarm_rate(counts),
            "median_segment_steps": float(np.median(segments)) if segments else None,
        }

    report = figures(np.ones_like(success))
    if len(components) > 1:
        report["by_component"] = {name: figures(component == i) for i, name in enumerate(components)}
    return report


class PairedEvaluation:
    """Scores params on the fixed test and validation contexts of one task and split (no operator)."""

    def __init__(self, task: str, split: str, actor: evaluate.Actor, test: int, validation: int):
        self.test = evaluate.TEST.with_episodes(test)
        self.validation = evaluate.VALIDATION.with_episodes(validation)
        self._test = evaluate.Evaluator(task, split, test, actor)
        self._validation = evaluate.Evaluator(task, split, validation, actor) if validation != test else None

    def on_validation(self, params) -> dict:
        """{"validation_success", "validation_ci"} on the validation contexts."""
        validation = (self._validation or self._test).on(params, self.validation)
        return {"validation_success": validation["success_rate"], "validation_ci": validation["success_ci"]}

    def __call__(self, params) -> dict:
        """The test report, with the validation success beside it."""
        return {**self._test.on(params, self.test), **self.on_validation(params)}


def paired_evaluation(config: Config, prior: Prior, actor: evaluate.Actor | None = None) -> PairedEvaluation:
    """The paired evaluation of `config.patch`, for the prior's chunk policy unless `actor` is given."""
    pc, tc = config.patch, config.target
    actor = actor or evaluate.chunk_actor(prior.graphdef, prior.stats)
    return PairedEvaluation(tc.task, tc.split, actor, tc.eval_episodes, pc.validation_episodes)


# ------------------------------------------------------------------------------------------ patching
@dataclasses.dataclass
class Learner:
    """Everything a patching run updates between rounds; `checkpointed` is what orbax saves.

    `published`: the params the gate last let through, which the deployment runs and the records score
    (None where no gate runs, as in the fleet learner, which gates its exports itself)."""

    state: sac.SACState | residual.ResidualState
    buffers: dict
    round: int
    totals: dict
    published: object = None
    reward_model: object = None
    """PRO's params as refreshed so far, when the reward is PRO's and it is refreshed on-policy."""

    def checkpointed(self) -> dict:
        saved = {
            "sac": self.state,
            "replay": self.buffers,
            "published": self.published,
            "reward_model": self.reward_model,
        }
        return {k: v for k, v in saved.items() if v is not None}


def make_insert():
    """`replay.insert` jitted with the buffer donated (online and patch blocks go through it)."""
    return jax.jit(replay.insert, static_argnames=("source", "interventions_only"), donate_argnums=0)


def insert_experience(insert, buffers: dict, block: dict) -> dict:
    """Every step of `block` into the online source, takeover steps (and the n after) into patch."""
    buffers = dict(buffers)
    for name, only in (("online", False), ("patch", True)):
        buffers[name] = insert(
            buffers[name], block, source=replay.SOURCES.index(name), interventions_only=only
        )
    return buffers


ZERO_EFFORT = {
    "corrective_episodes": 0,
    "takeover_segments": 0,
    "takeover_steps": 0,
    "env_steps": 0,
    "false_alarms": 0,
    "wall_s": 0.0,
}


def add_effort(totals: dict, step: dict, segments: list[int]) -> dict:
    """Running totals plus one round's effort; segment lengths are kept for their median."""
    added = {k: totals[k] + step.get(k, 0) for k in ZERO_EFFORT if k != "wall_s"}
    return {**totals, **added, "segment_lengths": totals.get("segment_lengths", []) + segments}


def observation_spec(model) -> dict:
    """One step's observation shapes, as the replay stores them."""
    return {k: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for k, s in model.observation_spec(1).items()}


def new_state(config: Config, prior: Prior, seed: int, actor: str = "full"):
    """A fresh learner state: "full" fine-tunes a copy of the prior's chunk policy (`learner.sac`),
    "residual" trains a zero-initialised residual on the frozen prior (`learner.residual`)."""
    sc, mc = config.sac, prior.model
    # The learner's state is donated; the prior's params stay intact.
    prior_params = jax.tree.map(jnp.copy, prior.params)
    if actor == "residual":
        _, residual_params, critic = residual.create_networks(prior, sc, seed)
        return residual.init_state(
            prior_params, residual_params, critic, sc.init_alpha, residual.make_optimizers(sc)
        )
    _, critic = nnx.split(mc.create_critic(seed + 1), nnx.Param)
    return sac.init_state(prior_params, critic, sc.init_alpha, sac.make_optimizers(sc))


def new_learner(
    config: Config, prior: Prior, offline: list[dict], mesh, seed: int, actor: str = "full"
) -> Learner:
    """A fresh learner (state of the `actor` kind, see `new_state`) with the offline data in its replay."""
    pc, mc = config.patch, prior.model
    replicated = sharding.replicated(mesh)
    state = new_state(config, prior, seed, actor)
    spec = observation_spec(mc)
    buffers = {
        name: replay.create(spec, mc.action_size, capacity, mesh, n_step=mc.chunk)
        for name, capacity in zip(replay.SOURCES, pc.capacity, strict=True)
    }
    if offline:
        rows = mesh.size * max(1, len(offline) // (4 * mesh.size))
        block = replay.from_episodes(offline, rows=rows)
        buffers["offline"] = make_insert()(buffers["offline"], block, source=replay.SOURCES.index("offline"))
    totals = dict(ZERO_EFFORT)
    return Learner(jax.device_put(state, replicated), buffers, 0, totals)


def critic_graphdef(model) -> nnx.GraphDef:
    return nnx.split(model.create_critic(0), nnx.Param)[0]


def operator_reach(nets: residual.Networks, prior_params, block: dict) -> dict:
    """`residual.correction_reach` over a rollout block's operator steps: how much of what the operator
    did the residual could express at its scale (the prior's action read on the block's observations)."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    obs = normalization.normalize(jax.tree.map(flat, block["obs"]), nets.stats)
    base = residual.base_action(nets, prior_params, obs)
    return residual.correction_reach(flat(block["action"]), base, nets.scale, flat(block["intervention"]))


def takeover_examples(folder: pathlib.Path, round_: int, block: dict, chunk: int) -> list[dict]:
    """Every round's takeover steps up to `round_` as BC examples (`intervention_examples`): this round's
    are written to `folder` first, so a resumed run reads the earlier rounds back from there."""
    folder.mkdir(parents=True, exist_ok=True)
    examples = intervention_examples(block, chunk)
    np.savez(
        folder / f"round{round_:03d}.npz",
        chunk=examples["chunk"],
        mask=examples["mask"],
        **{f"obs.{k}": v for k, v in examples["obs"].items()},
    )
    return saved_takeovers(folder, round_)


def saved_takeovers(folder: pathlib.Path, rounds: int) -> list[dict]:
    """The takeover examples `takeover_examples` wrote to `folder` for rounds 1 to `rounds`."""
    examples = []
    for r in range(1, rounds + 1):
        with np.load(folder / f"round{r:03d}.npz") as saved:
            obs = {k.removeprefix("obs."): saved[k] for k in saved.files if k.startswith("obs.")}
            examples.append({"obs": obs, "chunk": saved["chunk"], "mask": saved["mask"]})
    return examples


class PatchLearner:
    """The learner kind `config.sac.actor` names, bound once: its jitted train block, the actors that
    run its params (exploring and deterministic), what it deploys, and its critic pretraining."""

    def __init__(self, config: Config, prior: Prior, mesh):
        sc, mc, steps = config.sac, prior.model, config.patch.updates_per_round
        self.kind, self.prior = sc.actor, prior
        if self.kind == "residual":
            nets, _, _ = residual.create_networks(prior, sc, 0)
            spec = residual.make_spec(sc, mc, nets)
            self.train = residual.make_train_steps(spec, num_steps=steps, mesh=mesh)
            self.explore = residual.actor_fn(nets, explore=config.patch.explore)
            self.deterministic = residual.actor_fn(nets)
            self.pretrain = residual.make_critic_pretrain(spec) if sc.critic_pretrain_steps else None
            reach = jax.jit(functools.partial(operator_reach, nets))
            # On the host's numbers, so neither the replicated params nor the block's devices constrain it.
            self.reach = lambda base, block: reach(*jax.device_get((base, block)))
        else:
            nets = sac.Networks(actor=prior.graphdef, critic=critic_graphdef(mc), stats=prior.stats)
            self.train = sac.make_train_steps(sac.make_spec(sc, mc, nets), num_steps=steps, mesh=mesh)
            self.explore = evaluate.chunk_actor(prior.graphdef, prior.stats, explore=config.patch.explore)
            self.deterministic = evaluate.chunk_actor(prior.graphdef, prior.stats)
            self.pretrain = None
            self.reach = None
        self.nets = nets

    def deployable(self, state):
        """The params the actors run: the Polyak-averaged residual on the prior, or the fine-tuned policy.
        A copy: the state is donated to the next train block, published params outlive it."""
        params = residual.deployable(self.nets, state) if self.kind == "residual" else state.actor
        return jax.tree.map(jnp.copy, params)


def policy_actor(config: Config, prior: Prior) -> evaluate.Actor:
    """The deterministic actor that runs the params `run_patching` returns."""
    if config.sac.actor == "residual":
        nets, _, _ = residual.create_networks(prior, config.sac, 0)
        return residual.actor_fn(nets)
    return evaluate.chunk_actor(prior.graphdef, prior.stats)


def pretrain_critic(
    learner_kind: PatchLearner, state, offline: list[dict], block: dict, config: Config, mesh, key: jax.Array
):
    """Monte-Carlo regression of the residual's critic on the offline data and the first round's block."""
    keys = list(observation_spec(learner_kind.prior.model))
    data = residual.returns_dataset(offline, [block], config.sac.gamma, keys)
    data = residual.pad_dataset(data, dataset.bucket(len(data["return"])))
    data = jax.device_put(data, sharding.replicated(mesh))
    return learner_kind.pretrain(state, data, key)


GATE_REFERENCE_CONTEXTS = 128  # the validation size `patch.gate_margin` is stated for


def gate_tolerance(margin: float, contexts: int) -> float:
    """The gate's tolerated drop on `contexts` validation contexts: `margin` at 128, scaled like the
    binomial standard error, by sqrt(128 / contexts). Unscaled, 2 points at 32 contexts rejected any
    candidate one context (3.1 points) below the published params."""
    return margin * math.sqrt(GATE_REFERENCE_CONTEXTS / contexts)


def gate_passes(candidate_validation: float, published_validation: float, margin: float) -> bool:
    """The safety net: a candidate is published unless its validation success falls below the published
    params' by more than `margin`."""
    return candidate_validation >= published_validation - margin


@dataclasses.dataclass
class Programs:
    """What a patching run compiles, built once per config and prior and shared by its seeds, so a second
    seed compiles nothing: the learner kind, the operator's collector, the paired evaluation, the replay
    insert, with PRO's reward the shaping (its relabelling and refresh take PRO's params as input) and,
    with `patch.base` "hg_dagger", the BC retraining of the residual's base."""

    kind: PatchLearner
    collector: Collector
    evaluation: PairedEvaluation
    insert: object
    shaping: pro.Shaping | None
    mesh: object
    retrain_base: "Retrainer | None" = None

    @classmethod
    def build(cls, config: Config, prior: Prior, mesh=None, retrain: "Retrainer | None" = None) -> "Programs":
        """`retrain`: a `Retrainer` of the same config and prior already built (the baselines'), so the
        base's BC program is not compiled twice."""
        pc, tc, sc = config.patch, config.target, config.sac
        mesh = mesh or sharding.make_mesh()
        # Fail now, not after minutes of compiling (make_train_steps below checks the batch and its mix).
        if pc.envs_per_round % mesh.size:
            raise ValueError(
                f"patch.envs_per_round={pc.envs_per_round} must be a multiple of the {mesh.size} "
                "devices: each device's replay shard takes whole episodes"
            )
        if pc.base != "prior" and sc.actor != "residual":
            raise ValueError(
                f'patch.base="{pc.base}" retrains the residual\'s base: it needs sac.actor="residual" '
                '(with sac.actor="full", pass --patch.base prior)'
            )
        kind = PatchLearner(config, prior, mesh)
        shaping = None
        if pc.reward == "pro":
            shaping = pro.Shaping(
                pro.load(pc.pro),
                gamma=sc.gamma,
                beta=config.pro.shaping,
                risk_weight=config.pro.shaping_risk,
                mesh=mesh,
            )
        takeover = pro.risk_takeover(pro.load(pc.pro), pc.risk_trigger) if pc.risk_trigger else Takeover
        collector = Collector(
            tc.task,
            tc.split,
            pc.envs_per_round,
            config.operator,
            kind.explore,
            solo=pc.false_alarms,
            lookahead_actor=kind.deterministic,
            takeover=takeover,
            keep_record=shaping is not None and config.pro.refresh_steps > 0,
        )
        evaluation = paired_evaluation(config, prior, kind.deterministic)
        retrain_base = None
        if pc.base == "hg_dagger":
            retrain_base = retrain if retrain is not None else Retrainer(config, prior, mesh)
        return cls(kind, collector, evaluation, make_insert(), shaping, mesh, retrain_base)


def run_patching(
    config: Config,
    prior: Prior,
    offline: list[dict],
    run_dir: pathlib.Path,
    *,
    seed: int,
    programs: Programs | None = None,
    progress: bool = True,
) -> tuple[list[dict], object]:
    """Patches `prior` on `config.target.task`/`split`: one record per round (round 0 is the prior) and the
    published params (run them with `policy_actor`).

    Each round: roll out the published params under the operator, update the learner, score the
    candidate on the validation contexts and, if the gate lets it through, publish it; the record scores
    the published params on the test contexts. Resumes from `run_dir/checkpoints` if a previous run left
    one. Pass the same `programs` (`Programs.build`) to every seed of one config and prior.
    """
    pc, tc, sc = config.patch, config.target, config.sac
    programs = programs or Programs.build(config, prior)
    kind, collector, evaluation_on = programs.kind, programs.collector, programs.evaluation
    insert_online, shaping, mesh = programs.insert, programs.shaping, programs.mesh
    if shaping is not None:  # every seed starts from the PRO on disk (a refresh changes the model)
        shaping.model = pro.load(pc.pro)
        offline = shaping.episodes(offline)
    refreshing = shaping is not None and config.pro.refresh_steps > 0
    retraining_base = programs.retrain_base is not None and offline  # the offline part of its BC data
    offline_examples = dataset.flatten(offline, prior.model.chunk) if retraining_base else None

    learner = new_learner(config, prior, offline, mesh, seed, sc.actor)
    learner.published = kind.deployable(learner.state)
    learner.reward_model = shaping.model.params if refreshing else None
    checkpoints = Checkpoints(run_dir / "checkpoints", keep=2)
    log = MetricsLog(run_dir / "metrics.jsonl")
    records = []
    if checkpoints.latest_step() is not None:
        saved, meta = checkpoints.restore(learner.checkpointed())
        learner = Learner(
            saved["sac"],
            saved["replay"],
            meta["round"],
            meta["totals"],
            saved["published"],
            saved.get("reward_model"),
        )
        records = meta["records"]
        print(f"resumed {run_dir} after round {learner.round}")
    key = jax.random.key(seed)
    key_roll, key_train = jax.random.split(key)
    key_reward = jax.random.fold_in(key, 1)
    if refreshing:
        shaping.model = dataclasses.replace(shaping.model, params=learner.reward_model)

    if not records:
        records.append(
            {
                "kind": "patch",
                "round": 0,
                **effort_record(learner.totals),
                **evaluation_on(learner.published),
                "published": True,
            }
        )
        log.write(records[-1])
    bar = tqdm(
        total=pc.rounds,
        initial=learner.round,
        desc=f"patch {tc.task}/{tc.split}",
        unit="round",
        disable=not progress,
    )
    # Every round after the first should compile nothing; the clock stops listening when patching ends.
    with compile_cache.CompileClock() as compiling:
        while learner.round < pc.rounds:
            tic, compiled = time.perf_counter(), compiling.seconds
            round_ = learner.round + 1
            rolled = collector(learner.published, jax.random.fold_in(key_roll, round_), round_)
            block, extra = rolled["block"], {}
            if refreshing:  # on-policy: PRO first learns what this round's episodes did, then labels them
                extra = shaping.refresh(
                    jax.device_get(rolled.pop("record")),
                    tc.task,
                    round_,
                    config.pro,
                    jax.random.fold_in(key_reward, round_),
                    mesh=mesh,
                )
            if shaping is not None:
                block = shaping(block)
            buffers = insert_experience(insert_online, learner.buffers, block)
            state = learner.state
            if programs.retrain_base is not None:  # IBRL's BC half: HG-DAgger's policy becomes the base
                takeovers = takeover_examples(run_dir / "takeovers", round_, block, prior.model.chunk)
                base = programs.retrain_base(offline_examples, dataset.concatenate(*takeovers), seed=seed)
                state = state.replace(prior=base)
            if round_ == 1 and kind.pretrain is not None:
                state, pretrained = pretrain_critic(
                    kind, state, offline, block, config, mesh, jax.random.fold_in(key_train, 0)
                )
                extra = {**extra, **pretrained}
            state, metrics = kind.train(state, buffers, jax.random.fold_in(key_train, round_))
            if kind.reach is not None:
                reach = kind.reach(state.prior, block)
                extra = {**extra, **{f"operator_{k}": v for k, v in reach.items()}}
            jax.block_until_ready(state)
            totals = add_effort(
                learner.totals,
                effort(block, rolled.get("solo_success")),
                takeover_segments(np.asarray(block["intervention"])),
            )
            totals["wall_s"] = learner.totals["wall_s"] + time.perf_counter() - tic
            candidate = kind.deployable(state)
            checked = evaluation_on.on_validation(candidate)
            passed = not pc.gate or gate_passes(
                checked["validation_success"],
                records[-1]["validation_success"],
                gate_tolerance(pc.gate_margin, pc.validation_episodes),
            )
            published = candidate if passed else learner.published
            # Unpublished: the published params, scored on the same contexts, score as they did last round.
            scored = (
                evaluation_on(published) if passed else {k: v for k, v in records[-1].items() if k in SCORES}
            )
            reward_model = shaping.model.params if refreshing else None
            learner = Learner(state, buffers, round_, totals, published, reward_model)
            record = {
                "kind": "patch",
                "round": round_,
                **effort_record(totals),
                **scored,
                "published": passed,
                "candidate_validation": checked["validation_success"],
                "assisted_success": float(np.mean(np.asarray(rolled["success"]))),
                "compile_s": compiling.seconds - compiled,
                **{k: float(v) for k, v in jax.device_get({**extra, **metrics}).items()},
            }
            records.append(record)
            log.write(record)
            checkpoints.save(
                round_,
                learner.checkpointed(),
                {"round": round_, "totals": learner.totals, "records": records},
            )
            bar.update(1)
            bar.set_postfix(success=f"{record['success_rate']:.0%}", corrective=totals["corrective_episodes"])
        bar.close()
    checkpoints.close()
    return records, learner.published


# The fields of a record that score its params (a `PairedEvaluation` report).
SCORES = (
    "contexts",
    "contexts_seed",
    "episodes",
    "success_rate",
    "success_ci",
    "failure_modes",
    "retries_per_episode",
    "cycle_time_s",
    "recovery_rate",
    "episodes_with_failure",
    "throughput_per_hour",
    "by_component",
    "validation_success",
    "validation_ci",
)


def false_alarm_rate(counts: dict) -> float | None:
    """The share of corrective episodes the policy would have won alone."""
    return counts["false_alarms"] / counts["corrective_episodes"] if counts["corrective_episodes"] else None


def effort_record(totals: dict) -> dict:
    """What a record shows of the running effort totals: the counts, the false-alarm rate among corrective
    episodes and the median takeover segment."""
    lengths = totals.get("segment_lengths", [])
    return {
        **{k: totals[k] for k in ZERO_EFFORT},
        "false_alarm_rate": false_alarm_rate(totals),
        "median_segment_steps": float(np.median(lengths)) if lengths else None,
    }


# ----------------------------------------------------------------------------------------------- SFT
class Retrainer:
    """BC retraining from the prior with pretraining's optimiser settings, for `patch.sft_steps` steps:
    the SFT arms and each HG-DAgger round. Datasets are padded to power-of-two capacities, so the update
    compiles once per capacity, not once per dataset. With `patch.operator_share` > 0, that share of each
    batch is drawn from the operator's data (demonstrations or takeover steps), the rest from the offline
    demonstrations; at 0 every row is drawn alike."""

    def __init__(self, config: Config, prior: Prior, mesh=None):
        pc, pre = config.patch, config.pretrain
        self.prior, self.mesh = prior, mesh or sharding.make_mesh()
        block = pre.log_every
        self.blocks = max(1, pc.sft_steps // block)
        steps = self.blocks * block
        opt = pre.optimizer
        self.optimizer = bc.make_optimizer(
            opt.learning_rate, steps, min(opt.warmup_steps, steps // 10), opt.weight_decay
        )
        self.train = bc.make_train_steps(
            prior.graphdef,
            prior.stats,
            self.optimizer,
            num_steps=block,
            batch_size=pre.batch_size,
            nll_weight=pre.nll_weight,
            mesh=self.mesh,
            sample_fn=bc.focused_sampler(pc.operator_share) if pc.operator_share else bc.sample_batch,
        )

    def __call__(self, offline: dict | None, operator: dict | None = None, *, seed: int) -> nnx.State:
        """Params retrained on the flat datasets (`dataset.flatten`) `offline` and `operator` (either may be
        None); the prior's stay intact."""
        replicated = sharding.replicated(self.mesh)
        padded = jax.device_put(retraining_data(offline, operator), replicated)
        params = jax.tree.map(jnp.copy, self.prior.params)  # donated by the train step
        state = jax.device_put(bc.init_state(params, self.optimizer), replicated)
        key = jax.random.key(seed)
        for _ in range(self.blocks):
            state, _ = self.train(state, padded, key)
        return state.params


def retraining_data(offline: dict | None, operator: dict | None) -> dict:
    """The offline examples, then the operator's, padded to a power-of-two capacity; `focus` marks the row
    where the operator's begin (`bc.focused_sampler`)."""
    examples = dataset.concatenate(*[part for part in (offline, operator) if part is not None])
    padded = dataset.pad(examples, dataset.bucket(len(examples["chunk"])))
    return {**padded, "focus": np.int32(len(offline["chunk"]) if offline is not None else 0)}


def demonstrations(config: Config, split: str, episodes: int) -> list[dict]:
    """The first `episodes` operator demonstrations of the target task's `split`, generated with
    pretraining's noise where missing: `train` from pretraining's seed (the prior's own data), every other
    split from the next seed."""
    pre = config.pretrain
    return operator_demos.load_or_generate(
        pre.data_dir,
        config.target.task,
        split,
        episodes,
        seed=pre.seed if split == "train" else pre.seed + 1,
        noise=pre.demo_noise,
        bursts=pre.demo_bursts,
    )


def offline_demonstrations(config: Config) -> list[dict]:
    """The `train` demonstrations that patching, its baselines and RIPT's few-shot SFT learn from offline."""
    return demonstrations(config, "train", config.patch.offline_episodes)


def demonstration_effort(episodes: list[dict]) -> dict:
    """Full demonstrations: every episode is corrective, one segment long, every step the operator's."""
    steps = int(sum(len(ep["steps"]["action"]) for ep in episodes))
    return {
        "corrective_episodes": len(episodes),
        "takeover_segments": len(episodes),
        "takeover_steps": steps,
        "env_steps": steps,
        "false_alarms": 0,
    }


@dataclasses.dataclass
class RetrainPrograms:
    """What SFT and HG-DAgger compile, built once per config and prior and shared by their seeds: the BC
    retraining, the chunk policy's paired evaluation and HG-DAgger's operator-watched collector."""

    retrain: Retrainer
    evaluation: PairedEvaluation
    collector: Collector

    @classmethod
    def build(cls, config: Config, prior: Prior, mesh=None) -> "RetrainPrograms":
        pc, tc = config.patch, config.target
        deterministic = evaluate.chunk_actor(prior.graphdef, prior.stats)
        collector = Collector(
            tc.task,
            tc.split,
            pc.envs_per_round,
            config.operator,
            deterministic,
            solo=pc.false_alarms,
            lookahead_actor=deterministic,
        )
        return cls(Retrainer(config, prior, mesh), paired_evaluation(config, prior), collector)


def run_sft(
    config: Config,
    prior: Prior,
    demos: list[dict],
    offline: list[dict],
    *,
    seed: int,
    kind: str = "sft",
    programs: RetrainPrograms | None = None,
    progress: bool = True,
) -> tuple[list[dict], nnx.State]:
    """SFT retraining from the prior on the first N of `demos` plus the offline data, once per count in
    `config.patch.sft_demos`: full SFT (demonstrations of the split) or targeted SFT (of its tails). Returns
    one record per count and the params retrained on the most demonstrations."""
    pc, tc, chunk = config.patch, config.target, prior.model.chunk
    programs = programs or RetrainPrograms.build(config, prior)
    retrain, evaluation_on = programs.retrain, programs.evaluation
    offline_data = dataset.flatten(offline, chunk)
    records = []
    for count in tqdm(
        pc.sft_demos, desc=f"{kind} {tc.task}/{tc.split}", unit="retrain", disable=not progress
    ):
        tic = time.perf_counter()
        used = demos[:count]
        params = retrain(offline_data, dataset.flatten(used, chunk), seed=seed)
        jax.block_until_ready(params)  # dispatch is asynchronous: the clock must stop after the training
        records.append(
            {
                "kind": kind,
                "demos": count,
                **demonstration_effort(used),
                "wall_s": time.perf_counter() - tic,
                **evaluation_on(params),
            }
        )
    return records, params


def run_hg_dagger(
    config: Config,
    prior: Prior,
    offline: list[dict],
    *,
    seed: int,
    programs: RetrainPrograms | None = None,
    progress: bool = True,
) -> tuple[list[dict], nnx.State]:
    """HG-DAgger: each round the current BC policy runs `envs_per_round` episodes under the same operator
    triggers as patching; every operator step joins the aggregate, and the prior is retrained by BC on it
    plus the offline data. One record per round (round 0 is the prior) and the last round's params."""
    pc, tc, chunk = config.patch, config.target, prior.model.chunk
    programs = programs or RetrainPrograms.build(config, prior)
    collector, retrain, evaluation_on = programs.collector, programs.retrain, programs.evaluation
    offline_data, params, totals = dataset.flatten(offline, chunk), prior.params, dict(ZERO_EFFORT)
    takeovers = []
    key = jax.random.fold_in(jax.random.key(seed), 7)  # not patching's rollout keys
    records = [{"kind": "hg_dagger", "round": 0, **effort_record(totals), **evaluation_on(params)}]
    for round_ in tqdm(
        range(1, pc.hg_dagger_rounds + 1),
        desc=f"HG-DAgger {tc.task}/{tc.split}",
        unit="round",
        disable=not progress,
    ):
        tic = time.perf_counter()
        rolled = collector(params, jax.random.fold_in(key, round_), round_)
        block = jax.device_get(rolled["block"])
        takeovers.append(intervention_examples(block, chunk))
        params = retrain(offline_data, dataset.concatenate(*takeovers), seed=seed)
        totals = add_effort(
            totals, effort(block, rolled.get("solo_success")), takeover_segments(block["intervention"])
        )
        totals["wall_s"] += time.perf_counter() - tic
        records.append(
            {
                "kind": "hg_dagger",
                "round": round_,
                **effort_record(totals),
                **evaluation_on(params),
                "assisted_success": float(np.mean(np.asarray(rolled["success"]))),
            }
        )
    return records, params


def save_json(path: pathlib.Path, payload) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
