"""Recap (pi*0.6): advantage-conditioned policy training from autonomous rollouts and operator corrections.

One iteration, Algorithm 1 of the paper:
1. collect: the current policy (indicator positive) runs episodes on its own and with the scripted
   operator ready to take over; everything joins the dataset D (which starts with the task's
   demonstrations). D is the sharded replay, one source each: demonstrations ("offline"), autonomous
   rollouts ("online") and corrected rollouts ("patch"); each step is stored with its value target and
   its episode's success, computed at insertion;
2. value: a distributional value over 201 bins is trained by cross-entropy on D's Monte-Carlo returns:
   -1 per step until success, 0 at the success step, -C_fail at the end of a failure, all divided by the
   task's maximum episode length and clipped to [-1, 0] (a time-limit truncation is a failure: success
   means success within the limit);
3. advantages: A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t) (Monte-Carlo past the episode's end),
   computed on device at every stored step; the indicator is positive where A_t exceeds a per-task
   threshold set by quantile (about 40% of the rollout steps positive, 30% of the demonstration steps),
   and on every operator correction; it is written back to the replay beside each step;
4. policy: behaviour cloning of every step of D given its indicator, replaced by "none" 30% of the time,
   so one network learns both pi(a|o) and pi(a|I, o). Value and policy batches are drawn shard-locally
   from the replay's sources in fixed shares (`replay.sample_mixed`; 50:50 demonstrations and collected
   steps by default, the collected half split as autonomous and corrected episodes are collected), so
   the rollouts and their corrections are not drowned in `train` demonstrations;
5. evaluate with the indicator positive (optionally classifier-free guided by beta).
Each iteration also reports how well the advantage separates steps of successful episodes from steps of
failed ones (AUROC): on the steps its indicators were set from, and on the new episodes before the value
has seen them (held out).
Value and policy restart each iteration from their initial weights (the prior, with a zero indicator
embedding, so iteration 1 collects with the prior's behaviour).
"""

import dataclasses
import functools
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
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import bc
from learner import evaluate
from learner import patch
from learner import replay
from learner import sharding
from learner.pretrain import IterationLog
from learner.pretrain import Prior

# Threshold groups: one quantile per task and data stage. Demonstrations are the pretraining stage.
DEMOS, ROLLOUTS = 0, 1
# Where each kind of data lives in the replay: demonstrations, autonomous rollouts, corrected rollouts.
DEMONSTRATIONS, AUTONOMOUS, CORRECTED = "offline", "online", "patch"
# How the records name the collected sources ("autonomous_success", ...).
SOURCE_NAMES = {AUTONOMOUS: "autonomous", CORRECTED: "corrected"}


# ------------------------------------------------------------------------------- values, advantages
def step_rewards(valid: jax.Array, success: jax.Array, max_steps: int, c_fail: float) -> jax.Array:
    """Recap's reward, normalised by the task's maximum episode length. valid [E, T], success [E] -> [E, T].

    -1 on every step but the last; the last is 0 after a success and -C_fail after a failure (C_fail in
    units of `max_steps`). Steps past the end are 0.
    """
    last = valid & ~jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], axis=1)
    terminal = jnp.where(success, 0.0, -c_fail)[:, None]
    return jnp.where(last, terminal, jnp.where(valid, -1.0 / max_steps, 0.0))


def returns_to_go(rewards: jax.Array) -> jax.Array:
    """[E, T] -> [E, T]: sum of rewards from t to the end (no discount, as in the paper)."""
    return jnp.flip(jnp.cumsum(jnp.flip(rewards, axis=1), axis=1), axis=1)


def value_targets(rewards: jax.Array, value_range: tuple[float, float]) -> jax.Array:
    """Monte-Carlo returns clipped to the value's support [E, T]: failures sit at the bottom."""
    return jnp.clip(returns_to_go(rewards), *value_range)


def two_hot(x: jax.Array, support: jax.Array) -> jax.Array:
    """[N] values -> [N, bins] probabilities on the two nearest bin centres, weighted so the mean is x."""
    x = jnp.clip(x, support[0], support[-1])
    upper = jnp.clip(jnp.searchsorted(support, x, side="left"), 1, support.shape[0] - 1)
    lower = upper - 1
    weight_upper = (x - support[lower]) / (support[upper] - support[lower])
    bins = jnp.arange(support.shape[0])
    return (bins == lower[:, None]) * (1.0 - weight_upper)[:, None] + (bins == upper[:, None]) * weight_upper[
        :, None
    ]


def value_loss(params, batch: dict, *, graphdef, stats: dict, support: jax.Array) -> tuple[jax.Array, dict]:
    """Cross-entropy between the value's categorical and the two-hot return. batch: obs, value_target [B]."""
    logits = models.apply(graphdef, params, normalization.normalize(batch["obs"], stats))
    target = two_hot(batch["value_target"], support)
    loss = -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1))
    error = jnp.mean(jnp.abs(models.expected_value(logits, support) - batch["value_target"]))
    return loss, {"value_loss": loss, "value_error": error}


# ------------------------------------------------------------------------------------- indicators
def thresholds(
    advantage: np.ndarray, group: np.ndarray, eligible: np.ndarray, positive_fraction: dict[int, float]
) -> dict[int, float]:
    """Per group g, the (1 - fraction_g) quantile of its eligible advantages: that share lies above it."""
    found = {}
    for g, fraction in positive_fraction.items():
        members = advantage[(group == g) & eligible]
        if members.size:
            found[g] = float(np.quantile(members, 1.0 - fraction))
    return found


def indicators(
    advantage: np.ndarray, group: np.ndarray, forced: np.ndarray, threshold: dict[int, float]
) -> np.ndarray:
    """[N] int32: POSITIVE where the advantage beats its group's threshold or the step is forced
    (an operator correction), NEGATIVE elsewhere."""
    epsilon = np.vectorize(lambda g: threshold.get(int(g), np.inf), otypes=[np.float64])(group)
    positive = forced | (advantage > epsilon)
    return np.where(positive, models.INDICATOR_POSITIVE, models.INDICATOR_NEGATIVE).astype(np.int32)


def indicator_dropout(batch: dict, key: jax.Array, *, rate: float) -> dict:
    """The batch with each example's indicator replaced by NONE with probability `rate`."""
    dropped = jax.random.bernoulli(key, rate, batch["indicator"].shape)
    return {**batch, "indicator": jnp.where(dropped, models.INDICATOR_NONE, batch["indicator"])}


def auroc(score: np.ndarray, label: np.ndarray) -> float | None:
    """The probability that a random positive scores above a random negative (ties count half): the area
    under the ROC curve, by the Mann-Whitney rank sum. score, label [N]; None without both classes."""
    label = np.asarray(label, bool)
    positives, negatives = int(label.sum()), int((~label).sum())
    if positives == 0 or negatives == 0:
        return None
    values, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1  # ranks are 1-based; tied scores share their mean rank
    ranks = (first_rank + (counts - 1) / 2.0)[inverse]
    rank_sum = float(ranks[label].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def guided_chunk(graphdef, stats: dict, params: dict, obs: dict) -> tuple[jax.Array, jax.Array]:
    """The pre-tanh chunk mean with the indicator positive, classifier-free guided by params["beta"]
    against the indicator-free policy (`distributions.guided_mean`), and the conditioned log-std:
    [B, H, A] each."""
    obs = normalization.normalize(obs, stats)
    flag = jnp.full(obs["prompt"].shape[:1], models.INDICATOR_POSITIVE, jnp.int32)
    conditioned, log_std = models.apply(graphdef, params["policy"], obs, flag)
    unconditioned, _ = models.apply(graphdef, params["policy"], obs, None)
    return distributions.guided_mean(conditioned, unconditioned, params["beta"]), log_std


def guided_actor(graphdef, stats: dict) -> evaluate.Actor:
    """The evaluation actor on {"policy": params, "beta": []}: the mode of `guided_chunk`. beta is an
    input, not a constant, so one compiled evaluation serves the whole sweep."""

    def act(params, obs, key):
        mean, _ = guided_chunk(graphdef, stats, params, obs)
        return distributions.mode(mean)[:, 0]

    return act


def rollout_actor(graphdef, stats: dict) -> evaluate.Actor:
    """`guided_actor` on {"policy", "beta", "explore": []}, whose chunk is sampled from the policy where
    explore is set: collecting and evaluating differ only in inputs, so they share one compiled rollout."""

    def act(params, obs, key):
        mean, log_std = guided_chunk(graphdef, stats, params, obs)
        sampled, _ = distributions.sample(key, mean, log_std)
        return jnp.where(params["explore"], sampled, distributions.mode(mean))[:, 0]

    return act


def with_beta(params, beta: float) -> dict:
    """`guided_actor`'s input."""
    return {"policy": params, "beta": jnp.float32(beta)}


def conditioned_policy(prior: Prior, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """The prior with an advantage-indicator input whose embedding starts at zero: it acts as the prior
    for every indicator value until training separates them."""
    model = dataclasses.replace(prior.model, advantage_conditioned=True).create_policy(seed)
    nnx.update(model, prior.params)
    model.indicator.embedding[...] = jnp.zeros_like(model.indicator.embedding[...])
    return nnx.split(model, nnx.Param)


# ----------------------------------------------------------------------------------------- rollouts
class Rollouts:
    """Every episode Recap runs on its task and split, from one compiled rollout program: an iteration's
    collection, autonomous and corrected episodes in one batch, and every evaluation.

    The program runs `batch` episodes (the larger of a collection and an evaluation; rows a call does not
    need are dropped) of `rollout_actor` on the env under the operator's `trigger`, the operator switched
    off per episode (`Takeover.with_operator`): off for the autonomous episodes and for evaluations. A
    collection samples chunks (with `explore`) at guidance `guidance`; an evaluation takes the mode.
    Compiling an MJX rollout takes tens of seconds on a CPU: this is one program where there were three
    (two collectors and an evaluator).

    It evaluates as an `evaluate.Evaluator` of `episodes` episodes does (`on`, same contexts and report),
    on params {"policy", "beta"} (`with_beta`).
    """

    def __init__(
        self,
        task: str,
        split: str,
        graphdef,
        stats: dict,
        trigger: Trigger,
        *,
        autonomous: int,
        corrected: int,
        episodes: int,
        explore: bool = True,
        guidance: float = 1.0,
    ):
        """`autonomous` and `corrected` episodes per collection; `episodes` per evaluation."""
        if trigger.lookahead:
            raise ValueError("Recap's rollouts have no look-ahead policy: use a trigger without look-ahead")
        self.env = Takeover(envs.make(task, split), trigger)
        self.task, self.split, self.length = task, split, self.env.config.max_steps
        self.sizes = {AUTONOMOUS: autonomous, CORRECTED: corrected}
        self.episodes, self.explore, self.guidance = episodes, explore, guidance
        self.batch = max(autonomous + corrected, episodes)
        actor = rollout_actor(graphdef, stats)
        reset, step = jax.vmap(self.env.reset), jax.vmap(self.env.step)

        def rollouts(params, reset_keys, operator, key_act, version):
            start = Takeover.with_operator(reset(reset_keys), operator)
            last, record = rollout(step, lambda s, k: actor(params, s.obs, k), start, key_act, self.length)
            return {"block": patch.episode_block(record, version), **evaluate.outcomes(last)}

        self._run = jax.jit(rollouts)  # logged and counted as "jit(rollouts)"

    def _rows(self, params, reset_keys: jax.Array, operator: np.ndarray, key_act: jax.Array, version: int):
        """The program on `batch` episodes: {"block": [B, T] insert block, outcomes [B]}."""
        return self._run(
            evaluate.on_host(params), reset_keys, jnp.asarray(operator), key_act, jnp.int32(version)
        )

    def collect(self, params, key: jax.Array, version: int) -> dict[str, dict]:
        """One iteration's episodes of `params` (the policy's, indicator positive), per source that collects,
        as numpy: {source: {"block": the replay's insert block [E, T] (version `version`), "success": [E]}}.
        The contexts: the first autonomous + corrected of `batch` drawn from `key`, the autonomous first."""
        key_reset, key_act = jax.random.split(key)
        operator = np.arange(self.batch) >= self.sizes[AUTONOMOUS]
        actor_params = {
            "policy": params,
            "beta": jnp.float32(self.guidance),
            "explore": jnp.bool_(self.explore),
        }
        keys = evaluate.reset_keys(key_reset, self.batch)
        # On the host, where cutting rows compiles nothing.
        out = jax.device_get(self._rows(actor_params, keys, operator, key_act, version))
        by_source, start = {}, 0
        for name, count in self.sizes.items():
            if count:
                rows = lambda x, lo=start, hi=start + count: x[lo:hi]  # noqa: E731
                by_source[name] = {"block": jax.tree.map(rows, out["block"]), "success": rows(out["success"])}
            start += count
        return by_source

    def on(self, params, contexts: evaluate.Contexts) -> dict:
        """`evaluate.Evaluator.on` for params {"policy", "beta"}: the report on a fixed context set."""
        if contexts.episodes != self.episodes:
            raise ValueError(
                f"{contexts.name} holds {contexts.episodes} contexts; this evaluation runs {self.episodes}"
            )
        key_reset, key_act = jax.random.split(contexts.key)
        keys = evaluate.reset_keys(key_reset, self.episodes)
        if self.batch > self.episodes:  # rows to fill the program's batch, dropped below
            keys = jnp.concatenate([keys, evaluate.reset_keys(key_act, self.batch - self.episodes)])
        out = self._rows(
            {**params, "explore": jnp.bool_(False)}, keys, np.zeros(self.batch, bool), key_act, 0
        )
        outcomes = {k: np.asarray(v)[: self.episodes] for k, v in out.items() if k != "block"}
        return evaluate.report_on(contexts, outcomes, self.task, self.split)


# --------------------------------------------------------------------------------------- the data
@dataclasses.dataclass(frozen=True)
class Targets:
    """The constants of Recap's reward, value targets and advantages."""

    max_steps: int
    c_fail: float
    n: int
    value_range: tuple[float, float]


def extras_spec() -> dict[str, jax.ShapeDtypeStruct]:
    """What the replay stores per step for Recap besides the step itself (`replay.create`'s extras)."""
    return {
        "value_target": jax.ShapeDtypeStruct((), jnp.float32),
        "success": jax.ShapeDtypeStruct((), jnp.bool_),
        "indicator": jax.ShapeDtypeStruct((), jnp.int32),
    }


def recap_block(block: dict, success, targets: Targets) -> dict:
    """An insert block [E, T] with one episode a row (`patch.episode_block`, or `replay.from_episodes` with
    a row per episode) and its episodes' success [E] -> the block with Recap's reward and the extras:
    clipped Monte-Carlo value target, the episode's success, and a negative indicator until the first
    advantages are set (`with_indicators`)."""
    valid = jnp.asarray(block["valid"], bool)
    success = jnp.broadcast_to(jnp.asarray(success, bool)[:, None], valid.shape)
    rewards = step_rewards(valid, success[:, 0], targets.max_steps, targets.c_fail)
    extras = {
        "value_target": value_targets(rewards, targets.value_range),
        "success": success,
        "indicator": jnp.full(valid.shape, models.INDICATOR_NEGATIVE, jnp.int32),
    }
    return {**block, "reward": rewards, "extras": extras}


@functools.partial(jax.jit, static_argnames=("source", "targets"), donate_argnums=0)
def store(buffer: replay.Buffer, block: dict, success, *, source: str, targets: Targets) -> replay.Buffer:
    """`buffer` (the replay's `source`) with `block` appended, one episode a row, with Recap's reward and
    extras (`recap_block`); the buffer is donated. One compiled call per block shape."""
    return replay.insert(buffer, recap_block(block, success, targets), source=replay.SOURCES.index(source))


def source_shares(rc, demonstrations: bool) -> dict[str, float]:
    """Each source's share of a value or policy batch: `demo_share` from the demonstrations, the rest split
    between autonomous and corrected rollouts as they are collected (episodes per iteration); sources that
    never hold data are left out."""
    demo = rc.demo_share if demonstrations else 0.0
    collected = {AUTONOMOUS: rc.autonomous_per_iteration, CORRECTED: rc.corrected_per_iteration}
    total = sum(collected.values())
    shares = {DEMONSTRATIONS: demo, **{k: (1.0 - demo) * n / total for k, n in collected.items()}}
    return {k: v for k, v in shares.items() if v > 0}


def batch_ratios(shares: dict[str, float], batch_size: int, shards: int) -> dict[str, float]:
    """`shares` rounded so each source takes a whole number of draws on every shard (`replay.sample_mixed`
    draws every shard's part of every source), as ratios `replay.mix_counts` accepts."""
    per_shard = batch_size // shards
    names = list(shares)
    total = sum(shares.values())
    counts = {k: round(shares[k] / total * per_shard) for k in names[:-1]}
    counts[names[-1]] = per_shard - sum(counts.values())
    return {k: c / per_shard for k, c in counts.items()}


def draw_batch(
    buffers: dict, key: jax.Array, batch_size: int, *, ratios: dict[str, float], chunk: int
) -> dict:
    """A value or policy batch drawn shard-locally from the replay's sources by `ratios`: obs, chunk
    [B, H, A], mask [B, H], the stored value_target and indicator [B], and source [B]. P("data")."""
    batch = replay.sample_mixed(buffers, ratios, key, batch_size, chunk=chunk, gamma=1.0)
    return {
        "obs": batch["obs"],
        "chunk": batch["chunk"],
        "mask": batch["chunk_mask"],
        "value_target": batch["value_target"],
        "indicator": batch["indicator"],
        "source": batch["source"],
    }


def slot_advantages(buffer: replay.Buffer, value_params, *, predict, targets: Targets) -> dict:
    """On device, at every slot of one source: V(o_t) and A_t = clip(sum_{k<N} r_{t+k} + V(o_{t+N})) - V(o_t),
    [D, C] each. Past the episode's end the bootstrap is 0, which leaves the Monte-Carlo return (the paper
    is silent on episode ends; this is its N = T case). Unwritten slots hold junk."""

    def per_shard(local: replay.Buffer, params) -> dict:
        capacity = local.segment.shape[0]
        slots = jnp.arange(capacity)
        values = predict(params, local.obs)
        # gamma 1: Recap's return is undiscounted; discount 0 where the episode ends within the N steps.
        ahead = replay.gather(local, slots, n_step=targets.n, chunk=1, gamma=1.0)
        bootstrap = jnp.where(ahead["discount"] > 0, values[(slots + targets.n) % capacity], 0.0)
        advantage = jnp.clip(ahead["reward"] + bootstrap, *targets.value_range) - values
        return {"value": values, "advantage": advantage}

    return replay.map_slots(per_shard, buffer, value_params)


def step_table(buffers: dict, advantages: dict) -> dict[str, np.ndarray]:
    """Every stored step of every source, flat [N] on the host, source after source: advantage, threshold
    group, forced (an operator correction during a rollout), success, version (the iteration that
    collected it)."""
    columns = {k: [] for k in ("advantage", "group", "forced", "success", "version")}
    for name, buffer in buffers.items():
        written = np.asarray(replay.written(buffer))
        rollout = name != DEMONSTRATIONS
        columns["advantage"].append(np.asarray(advantages[name]["advantage"])[written])
        columns["group"].append(np.full(int(written.sum()), ROLLOUTS if rollout else DEMOS))
        columns["forced"].append(np.asarray(buffer.intervention)[written] & rollout)
        columns["success"].append(np.asarray(buffer.extras["success"])[written])
        columns["version"].append(np.asarray(buffer.version)[written])
    return {k: np.concatenate(v) for k, v in columns.items()}


def with_indicators(buffers: dict, indicator: np.ndarray) -> dict:
    """The buffers with `indicator` [N] (in `step_table` order) stored at their written slots."""
    out, start = {}, 0
    for name, buffer in buffers.items():
        written = np.asarray(replay.written(buffer))
        per_slot = np.full(written.shape, models.INDICATOR_NEGATIVE, np.int32)
        per_slot[written] = indicator[start : start + int(written.sum())]
        start += int(written.sum())
        stored = jax.device_put(per_slot, buffer.extras["indicator"].sharding)
        out[name] = buffer.replace(extras={**buffer.extras, "indicator": stored})
    return out


def create_buffers(
    config: Config, offline: list[dict], sizes: dict[str, int], length: int, mesh, targets: Targets
) -> dict:
    """One replay buffer per source that will hold data (`sizes`: episodes per iteration of each collected
    source, `length` steps each), sized for the whole run so nothing is ever overwritten and every fit
    compiles once; the demonstrations are inserted, one episode a row."""
    mc, shards = config.model, mesh.shape[sharding.DATA]
    obs_spec = {k: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for k, s in mc.observation_spec(1).items()}
    capacities = {source: config.recap.iterations * n * length for source, n in sizes.items() if n}
    block = None
    if offline:
        rows = -(-len(offline) // shards) * shards
        block = replay.from_episodes(offline, rows=rows, obs_keys=obs_spec)
        success = [ep["episode_metadata"]["success"] for ep in offline] + [False] * (rows - len(offline))
        capacities[DEMONSTRATIONS] = block["valid"].size
    buffers = {
        k: replay.create(obs_spec, mc.action_size, capacities[k], mesh, extras_spec(), n_step=mc.chunk)
        for k in replay.SOURCES
        if k in capacities
    }
    if block is not None:
        buffers[DEMONSTRATIONS] = store(
            buffers[DEMONSTRATIONS], block, np.asarray(success, bool), source=DEMONSTRATIONS, targets=targets
        )
    return buffers


# --------------------------------------------------------------------------------------- training
def make_fit(loss_fn, steps: int, rc, *, mesh, ratios: dict[str, float], chunk: int, prepare=None):
    """`fit(init_params, buffers, seed) -> (params, metrics)`: `steps` AdamW steps (pretraining's schedule
    shape) from a copy of `init_params` on batches drawn from the replay by `draw_batch`, jitted once for
    every iteration and seed."""
    block = min(steps, 250)
    steps -= steps % block
    optimizer = bc.make_optimizer(rc.learning_rate, steps, steps // 10, 1e-4)
    sharding.check_batch_size(rc.batch_size, mesh)
    replicated = sharding.replicated(mesh)
    train = jax.jit(
        functools.partial(
            bc.train_steps,
            num_steps=block,
            batch_size=rc.batch_size,
            batch_sharding=sharding.batch_sharded(mesh),
            update_fn=functools.partial(bc.update, loss_fn=loss_fn, optimizer=optimizer),
            sample_fn=functools.partial(draw_batch, ratios=ratios, chunk=chunk),
            prepare=prepare,
        ),
        donate_argnums=0,
        in_shardings=(replicated, None, replicated),
        out_shardings=replicated,
    )

    def fit(init_params, buffers: dict, seed: int):
        params = jax.tree.map(jnp.copy, init_params)  # the train step donates its state
        state = jax.device_put(bc.init_state(params, optimizer), replicated)
        metrics = {}
        for _ in range(steps // block):
            state, metrics = train(state, buffers, jax.random.key(seed))
        return state.params, {k: float(v) for k, v in jax.device_get(metrics).items()}

    return fit


def make_update(loss_fn, optimizer, mesh, prepare=None):
    """One value or policy update on a given batch, jitted for a mesh: state replicated and donated, batch
    split along B (`prepare(batch, key)`, if given, first). The pure update the data-parallel test
    compares across meshes; `make_fit` runs the same one on batches from the replay."""
    update_fn = functools.partial(bc.update, loss_fn=loss_fn, optimizer=optimizer)

    def update(state, batch, key):
        return update_fn(state, prepare(batch, key) if prepare is not None else batch)

    replicated = sharding.replicated(mesh)
    in_shardings = (replicated, sharding.batch_sharded(mesh), replicated)
    return jax.jit(update, donate_argnums=0, in_shardings=in_shardings, out_shardings=replicated)


def value_loss_fn(prior: Prior, value_graphdef):
    return functools.partial(
        value_loss, graphdef=value_graphdef, stats=prior.stats, support=prior.model.value_support()
    )


def policy_loss_fn(config: Config, prior: Prior, graphdef):
    return functools.partial(
        bc.bc_loss, graphdef=graphdef, stats=prior.stats, nll_weight=config.pretrain.nll_weight
    )


def make_value_fit(config: Config, prior: Prior, value_graphdef, mesh, ratios: dict[str, float]):
    """Cross-entropy fitting of the value on the stored value targets."""
    return make_fit(
        value_loss_fn(prior, value_graphdef),
        config.recap.value_steps,
        config.recap,
        mesh=mesh,
        ratios=ratios,
        chunk=config.model.chunk,
    )


def make_policy_fit(config: Config, prior: Prior, graphdef, mesh, ratios: dict[str, float]):
    """BC conditioned on the stored indicators, dropped out at the configured rate."""
    prepare = functools.partial(indicator_dropout, rate=config.recap.indicator_dropout)
    return make_fit(
        policy_loss_fn(config, prior, graphdef),
        config.recap.policy_steps,
        config.recap,
        mesh=mesh,
        ratios=ratios,
        chunk=config.model.chunk,
        prepare=prepare,
    )


def predict_values(value_graphdef, params, obs: dict, stats: dict, support: jax.Array) -> jax.Array:
    """V(o) [N] for observations {k: [N, ...]}."""
    logits = models.apply(value_graphdef, params, normalization.normalize(obs, stats))
    return models.expected_value(logits, support)


# -------------------------------------------------------------------------------------------- loop
def set_indicators(buffers: dict, advantages: dict, rc) -> tuple[dict, dict]:
    """Thresholds per group by quantile over the stored advantages (corrections left out, they are forced
    positive), every stored step's indicator written back to the replay, and the figures to log."""
    table = step_table(buffers, advantages)
    fractions = {DEMOS: rc.demo_positive_fraction, ROLLOUTS: rc.positive_fraction}
    threshold = thresholds(table["advantage"], table["group"], ~table["forced"], fractions)
    indicator = indicators(table["advantage"], table["group"], table["forced"], threshold)
    rollout = table["group"] == ROLLOUTS
    positive = indicator == models.INDICATOR_POSITIVE
    figures = {
        "dataset_steps": int(len(indicator)),
        "demo_steps": int(np.sum(~rollout)),
        "positive_share": float(np.mean(positive)),
        "rollout_positive_share": float(np.mean(positive[rollout])),
        "forced_positive_steps": int(table["forced"].sum()),
        "thresholds": {str(k): v for k, v in threshold.items()},
        "advantage_auroc": auroc(table["advantage"][rollout], table["success"][rollout]),
    }
    return with_indicators(buffers, indicator), figures


def heldout_auroc(buffers: dict, advantages: dict, iteration: int) -> float | None:
    """The advantage's AUROC for episode success on the steps collected in `iteration`, from a value that
    was fitted before they were collected."""
    table = step_table(buffers, advantages)
    new = (table["group"] == ROLLOUTS) & (table["version"] == iteration)
    return auroc(table["advantage"][new], table["success"][new])


def run_recap(
    config: Config,
    prior: Prior,
    offline: list[dict],
    *,
    seed: int,
    rollouts: Rollouts,
    run_dir: pathlib.Path,
    mesh=None,
    progress: bool = True,
) -> tuple[list[dict], nnx.State]:
    """Recap iterations from the prior: one record per iteration (0: the prior) and the final policy.

    `rollouts` collects with the conditioned policy, indicator positive, and evaluates it (params
    `with_beta(params, recap.guidance)`). The caller builds it once (compiles are slow) and shares it
    across seeds. Every episode goes into the sharded replay (demonstrations, autonomous and corrected
    rollouts, one source each); value and policy batches are drawn from it.
    """
    rc, mc = config.recap, prior.model
    mesh = mesh or sharding.make_mesh()
    uneven = {k: n for k, n in rollouts.sizes.items() if n % mesh.size}
    if uneven:
        raise ValueError(
            f"episodes per iteration {uneven} must be multiples of the {mesh.size} devices: "
            "each device's replay shard takes whole episodes"
        )
    targets = Targets(rollouts.length, rc.c_fail, rc.advantage_steps, mc.value_range)
    graphdef, policy_init = conditioned_policy(prior, seed)
    value_graphdef, value_init = nnx.split(mc.create_value(seed + 1), nnx.Param)
    predict = functools.partial(predict_values, value_graphdef, stats=prior.stats, support=mc.value_support())
    advantages_of = jax.jit(
        lambda buffers, params: {
            k: slot_advantages(b, params, predict=predict, targets=targets) for k, b in buffers.items()
        }
    )
    buffers = create_buffers(config, offline, rollouts.sizes, rollouts.length, mesh, targets)
    ratios = batch_ratios(source_shares(rc, bool(offline)), rc.batch_size, mesh.size)
    fit_value = make_value_fit(config, prior, value_graphdef, mesh, ratios)
    fit_policy = make_policy_fit(config, prior, graphdef, mesh, ratios)
    # Placed as the fits' outputs are, so the collectors and the evaluator see one input sharding and
    # compile once (an unplaced start recompiled all three in the second iteration).
    policy_init, value_init = jax.device_put((policy_init, value_init), sharding.replicated(mesh))
    params, value_params = policy_init, value_init
    key_collect, _ = jax.random.split(jax.random.key(seed))  # the second key once drew evaluations
    totals = {
        "env_steps": 0,
        "corrective_episodes": 0,
        "takeover_segments": 0,
        "takeover_steps": 0,
        "collected_episodes": 0,
        "wall_s": 0.0,
    }
    progress_log = IterationLog("recap", rollouts, run_dir / "metrics.jsonl")
    progress_log(with_beta(params, rc.guidance), 0, totals)
    where = f"{config.target.task}/{config.target.split}"
    bar = tqdm(
        range(1, rc.iterations + 1), desc=f"Recap {where} seed {seed}", unit="iter", disable=not progress
    )
    for iteration in bar:
        tic = time.perf_counter()
        collected = {}
        # The block's version is the iteration.
        by_source = rollouts.collect(params, jax.random.fold_in(key_collect, iteration), iteration)
        for source, out in by_source.items():
            for k, v in patch.effort(out["block"]).items():
                totals[k] += v
            totals["collected_episodes"] += rollouts.sizes[source]
            collected[SOURCE_NAMES[source]] = float(np.mean(out["success"]))
            buffers[source] = store(
                buffers[source], out["block"], out["success"], source=source, targets=targets
            )
        heldout = None
        if iteration > 1:  # the value fitted last iteration has not seen these episodes
            heldout = heldout_auroc(buffers, advantages_of(buffers, value_params), iteration)
        value_params, value_metrics = fit_value(value_init if rc.from_prior else value_params, buffers, seed)
        buffers, figures = set_indicators(buffers, advantages_of(buffers, value_params), rc)
        params, policy_metrics = fit_policy(policy_init if rc.from_prior else params, buffers, seed)
        jax.block_until_ready(params)
        totals["wall_s"] += time.perf_counter() - tic
        extra = {
            **{f"{k}_success": v for k, v in collected.items()},
            **figures,
            "advantage_auroc_heldout": heldout,
            **value_metrics,
            **policy_metrics,
        }
        record = progress_log(with_beta(params, rc.guidance), iteration, totals, extra)
        bar.set_postfix(
            success=f"{record['success_rate']:.0%}",
            positive=f"{extra['positive_share']:.0%}",
            auroc=f"{extra['advantage_auroc'] or 0:.2f}",
        )
    return progress_log.records, params


def guidance_sweep(
    evaluator: Rollouts | evaluate.Evaluator, params, betas: tuple[float, ...]
) -> dict[str, dict]:
    """The final policy on the evaluator's test contexts at each guidance weight beta: {str(beta): report}."""
    contexts = evaluate.TEST.with_episodes(evaluator.episodes)
    return {str(beta): evaluator.on(with_beta(params, beta), contexts) for beta in betas}
