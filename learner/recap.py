"""Recap (pi*0.6): advantage-conditioned policy training from autonomous rollouts and operator corrections.

One iteration, Algorithm 1 of the paper:
1. collect: the current policy (indicator positive) runs episodes on its own and with the scripted
   operator ready to take over; everything joins the dataset D (which starts with the task's
   demonstrations);
2. value: a distributional value over 201 bins is trained by cross-entropy on D's Monte-Carlo returns:
   -1 per step until success, 0 at the success step, -C_fail at the end of a failure, all divided by the
   task's maximum episode length and clipped to [-1, 0] (a time-limit truncation is a failure: success
   means success within the limit);
3. advantages: A_t = sum_{k<N} r_{t+k} + V(o_{t+N}) - V(o_t) (Monte-Carlo past the episode's end); the
   indicator is positive where A_t exceeds a per-task threshold set by quantile (about 40% of the
   rollout steps positive, 30% of the demonstration steps), and on every operator correction;
4. policy: behaviour cloning of every step of D given its indicator, replaced by "none" 30% of the time,
   so one network learns both pi(a|o) and pi(a|I, o). Value and policy batches draw demonstrations and
   collected steps in fixed shares (50:50 by default), so the rollouts and their corrections are not
   drowned in `train` demonstrations;
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

from configs import Config
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import bc
from learner import dataset
from learner import evaluate
from learner import patch
from learner import replay
from learner import sharding
from learner.pretrain import IterationLog
from learner.pretrain import Prior

# Threshold groups: one quantile per task and data stage. Demonstrations are the pretraining stage.
DEMOS, ROLLOUTS = 0, 1


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


def n_step_advantage(rewards: jax.Array, values: jax.Array, valid: jax.Array, n: int,
                     value_range: tuple[float, float]) -> jax.Array:  # fmt: skip
    """A_t = clip(sum_{k<n} r_{t+k} + V(o_{t+n})) - V(o_t), all [E, T]; past the end the bootstrap is 0,
    which leaves the Monte-Carlo return (the paper is silent on episode ends; this is its N = T case)."""
    steps = rewards.shape[1]
    cumulative = jnp.concatenate([jnp.zeros_like(rewards[:, :1]), jnp.cumsum(rewards, axis=1)], axis=1)
    ahead = jnp.minimum(jnp.arange(steps) + n, steps)  # [T]
    partial = cumulative[:, ahead] - cumulative[:, :steps]
    bootstrap_index = jnp.minimum(ahead, steps - 1)
    bootstrap = jnp.where((ahead < steps) & valid[:, bootstrap_index], values[:, bootstrap_index], 0.0)
    return jnp.clip(partial + bootstrap, *value_range) - values


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
def thresholds(advantage: np.ndarray, group: np.ndarray, eligible: np.ndarray,
               positive_fraction: dict[int, float]) -> dict[int, float]:  # fmt: skip
    """Per group g, the (1 - fraction_g) quantile of its eligible advantages: that share lies above it."""
    found = {}
    for g, fraction in positive_fraction.items():
        members = advantage[(group == g) & eligible]
        if members.size:
            found[g] = float(np.quantile(members, 1.0 - fraction))
    return found


def indicators(advantage: np.ndarray, group: np.ndarray, forced: np.ndarray,
               threshold: dict[int, float]) -> np.ndarray:  # fmt: skip
    """[N] int32: POSITIVE where the advantage beats its group's threshold or the step is forced
    (an operator correction), NEGATIVE elsewhere."""
    epsilon = np.vectorize(lambda g: threshold.get(int(g), np.inf), otypes=[np.float64])(group)
    positive = forced | (advantage > epsilon)
    return np.where(positive, models.INDICATOR_POSITIVE, models.INDICATOR_NEGATIVE).astype(np.int32)


def indicator_dropout(batch: dict, key: jax.Array, *, rate: float) -> dict:
    """The batch with each example's indicator replaced by NONE with probability `rate`."""
    dropped = jax.random.bernoulli(key, rate, batch["indicator"].shape)
    return {**batch, "indicator": jnp.where(dropped, models.INDICATOR_NONE, batch["indicator"])}


def two_source_batch(data: dict, key: jax.Array, batch_size: int, *, demo_share: float) -> dict:
    """`batch_size` examples, each from the demonstrations (rows [0, demo_size)) with probability
    `demo_share`, else from the collected steps (rows [demo_size, size)), uniform within its source; uniform
    over [0, size) while either source is empty. data: padded (`dataset.pad`) with `size` and `demo_size`."""
    size, demo_size = data["size"], data["demo_size"]
    key_source, key_demo, key_collected, key_any = jax.random.split(key, 4)
    from_demos = jax.random.bernoulli(key_source, demo_share, (batch_size,))
    demo_row = jax.random.randint(key_demo, (batch_size,), 0, jnp.maximum(demo_size, 1))
    collected_row = jax.random.randint(
        key_collected, (batch_size,), demo_size, jnp.maximum(size, demo_size + 1)
    )
    any_row = jax.random.randint(key_any, (batch_size,), 0, size)
    both = (demo_size > 0) & (size > demo_size)
    index = jnp.where(both, jnp.where(from_demos, demo_row, collected_row), any_row)
    return jax.tree.map(lambda x: x[index], {k: v for k, v in data.items() if k not in ("size", "demo_size")})


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


def guided_actor(graphdef, stats: dict) -> evaluate.Actor:
    """The evaluation actor on {"policy": params, "beta": []}: the mean chunk with the indicator positive,
    classifier-free guided by beta against the indicator-free policy (`distributions.guided_mean`). beta is
    an input, not a constant, so one compiled evaluation serves the whole sweep."""

    def act(params, obs, key):
        obs = normalization.normalize(obs, stats)
        flag = jnp.full(obs["prompt"].shape[:1], models.INDICATOR_POSITIVE, jnp.int32)
        conditioned, _ = models.apply(graphdef, params["policy"], obs, flag)
        unconditioned, _ = models.apply(graphdef, params["policy"], obs, None)
        mean = distributions.guided_mean(conditioned, unconditioned, params["beta"])
        return distributions.mode(mean)[:, 0]

    return act


def with_beta(params, beta: float) -> dict:
    """`guided_actor`'s input."""
    return {"policy": params, "beta": jnp.float32(beta)}


def conditioned_policy(prior: Prior, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """The prior with an advantage-indicator input whose embedding starts at zero: it acts as the prior
    for every indicator value until training separates them."""
    model = dataclasses.replace(prior.config.model, advantage_conditioned=True).create_policy(seed)
    nnx.update(model, prior.params)
    model.indicator.embedding[...] = jnp.zeros_like(model.indicator.embedding[...])
    return nnx.split(model, nnx.Param)


# --------------------------------------------------------------------------------------- the data
@dataclasses.dataclass
class Block:
    """Episodes as padded rows [E, T, ...] (one episode a row) with what Recap needs of them."""

    obs: dict
    action: np.ndarray  # [E, T, A] executed
    valid: np.ndarray  # [E, T]
    forced: np.ndarray  # [E, T] operator corrections during rollouts: indicator forced positive
    success: np.ndarray  # [E]
    group: int  # threshold group

    @classmethod
    def from_insert_block(cls, block: dict, success, group: int, obs_keys) -> "Block":
        """From `patch.episode_block` / `replay.from_episodes` output (one episode per row). Takeover steps
        of rollouts are corrections; a demonstration's steps are all the operator's but are not: they get
        the quantile threshold like any other data (the paper's pretraining stage)."""
        b = jax.device_get(block)
        obs = {k: np.asarray(b["obs"][k]) for k in obs_keys}
        forced = np.asarray(b["intervention"]) & (group == ROLLOUTS)
        return cls(obs, np.asarray(b["action"]), np.asarray(b["valid"]), forced, np.asarray(success, bool),
                   group)  # fmt: skip

    def episodes(self) -> list[dict]:
        """The rows as in-memory episodes, in row order, for `dataset.flatten`."""
        lengths = self.valid.sum(axis=1)
        return [
            {
                "steps": {
                    "observation": {k: v[e, :n] for k, v in self.obs.items()},
                    "action": self.action[e, :n],
                }
            }
            for e, n in enumerate(lengths)
        ]


def block_rewards(block: Block, config: "Targets") -> jax.Array:
    return step_rewards(jnp.asarray(block.valid), jnp.asarray(block.success), config.max_steps, config.c_fail)


def block_value_targets(block: Block, config: "Targets") -> np.ndarray:
    """[E, T] clipped Monte-Carlo returns of one block."""
    return np.asarray(value_targets(block_rewards(block, config), config.value_range))


def block_advantages(block: Block, values: np.ndarray, config: "Targets") -> np.ndarray:
    """[E, T] N-step advantages of one block given V at every step [E, T]."""
    valid = jnp.asarray(block.valid)
    advantage = n_step_advantage(block_rewards(block, config), jnp.asarray(values), valid, config.n,
                                 config.value_range)  # fmt: skip
    return np.asarray(advantage)


@dataclasses.dataclass(frozen=True)
class Targets:
    """The constants `block_advantages` needs."""

    max_steps: int
    c_fail: float
    n: int
    value_range: tuple[float, float]


def flat_examples(blocks: list[Block], chunk: int) -> dict:
    """Every valid step of every block as one BC example (obs, chunk, mask), row-major over blocks."""
    return dataset.flatten([ep for b in blocks for ep in b.episodes()], chunk)


def flat_steps(per_block: list[np.ndarray], blocks: list[Block]) -> np.ndarray:
    """Per-step arrays [E, T] of each block -> [N] in `flat_examples` order."""
    return np.concatenate([x[b.valid] for x, b in zip(per_block, blocks, strict=True)])


def unflatten(flat: np.ndarray, blocks: list[Block]) -> list[np.ndarray]:
    """[N] in `flat_examples` order -> per block [E, T] (0 past each episode's end)."""
    out, start = [], 0
    for b in blocks:
        per_step = np.zeros(b.valid.shape, flat.dtype)
        count = int(b.valid.sum())
        per_step[b.valid] = flat[start : start + count]
        out.append(per_step)
        start += count
    return out


# --------------------------------------------------------------------------------------- training
def make_fit(loss_fn, steps: int, rc, *, mesh, prepare=None):
    """`fit(init_params, data, seed) -> (params, metrics)`: `steps` AdamW steps (pretraining's schedule
    shape) from a copy of `init_params` on batches drawn by `two_source_batch`, jitted once for every
    iteration and seed. data: padded, with `size` and `demo_size`."""
    block = min(steps, 250)
    steps -= steps % block
    optimizer = bc.make_optimizer(rc.learning_rate, steps, steps // 10, 1e-4)
    sharding.check_batch_size(rc.batch_size, mesh)
    replicated = sharding.replicated(mesh)
    train = jax.jit(functools.partial(
        bc.train_steps, num_steps=block, batch_size=rc.batch_size,
        batch_sharding=sharding.batch_sharded(mesh),
        update_fn=functools.partial(bc.update, loss_fn=loss_fn, optimizer=optimizer),
        sample_fn=functools.partial(two_source_batch, demo_share=rc.demo_share), prepare=prepare,
    ), donate_argnums=0, in_shardings=(replicated,) * 3, out_shardings=replicated)  # fmt: skip

    def fit(init_params, data: dict, seed: int):
        params = jax.tree.map(jnp.copy, init_params)  # the train step donates its state
        state = jax.device_put(bc.init_state(params, optimizer), replicated)
        data = jax.device_put(data, replicated)
        metrics = {}
        for _ in range(steps // block):
            state, metrics = train(state, data, jax.random.key(seed))
        return state.params, {k: float(v) for k, v in jax.device_get(metrics).items()}

    return fit


def make_value_fit(config: Config, prior: Prior, value_graphdef, mesh):
    """Cross-entropy fitting of the value on data with obs and value_target."""
    support = prior.config.model.value_support()
    loss_fn = functools.partial(value_loss, graphdef=value_graphdef, stats=prior.stats, support=support)
    return make_fit(loss_fn, config.recap.value_steps, config.recap, mesh=mesh)


def make_policy_fit(config: Config, prior: Prior, graphdef, mesh):
    """BC conditioned on data["indicator"], dropped out at the configured rate."""
    rc, pre = config.recap, config.pretrain
    loss_fn = functools.partial(bc.bc_loss, graphdef=graphdef, stats=prior.stats, nll_weight=pre.nll_weight)
    prepare = functools.partial(indicator_dropout, rate=rc.indicator_dropout)
    return make_fit(loss_fn, rc.policy_steps, rc, mesh=mesh, prepare=prepare)


def predict_values(value_graphdef, params, obs: dict, stats: dict, support: jax.Array) -> jax.Array:
    """V(o) [N] for observations {k: [N, ...]}."""
    logits = models.apply(value_graphdef, params, normalization.normalize(obs, stats))
    return models.expected_value(logits, support)


# -------------------------------------------------------------------------------------------- loop
def step_success(blocks: list[Block]) -> np.ndarray:
    """[N] in `flat_examples` order: whether each step's episode succeeded."""
    return flat_steps([np.broadcast_to(b.success[:, None], b.valid.shape) for b in blocks], blocks)


def heldout_advantages(predict, value_params, blocks: list[Block], targets: Targets) -> list[np.ndarray]:
    """Per block [E, T]: advantages from a value that has not been fitted on these blocks' episodes."""
    out = []
    for b in blocks:
        rows, steps = b.valid.shape
        flat_obs = {k: v.reshape(rows * steps, *v.shape[2:]) for k, v in b.obs.items()}
        values = np.asarray(predict(value_params, flat_obs)).reshape(rows, steps)
        out.append(block_advantages(b, values, targets))
    return out


def run_recap(config: Config, prior: Prior, offline: list[dict], *, seed: int, autonomous: patch.Collector,
              corrected: patch.Collector, evaluator: evaluate.Evaluator, run_dir: pathlib.Path, mesh=None,
              progress: bool = True) -> tuple[list[dict], nnx.State]:  # fmt: skip
    """Recap iterations from the prior: one record per iteration (0: the prior) and the final policy.

    The collectors run the conditioned policy with the indicator positive; the evaluator runs
    `guided_actor` (its params: `with_beta(params, recap.guidance)`). The caller builds them once (compiles
    are slow) and shares them across seeds.
    """
    rc, mc = config.recap, prior.config.model
    mesh = mesh or sharding.make_mesh()
    obs_keys = tuple(mc.observation_spec(1))
    targets = Targets(autonomous.length, rc.c_fail, rc.advantage_steps, mc.value_range)
    graphdef, policy_init = conditioned_policy(prior, seed)
    value_graphdef, value_init = nnx.split(mc.create_value(seed + 1), nnx.Param)
    predict = jax.jit(functools.partial(predict_values, value_graphdef, stats=prior.stats,
                                        support=mc.value_support()))  # fmt: skip
    fit_value = make_value_fit(config, prior, value_graphdef, mesh)
    fit_policy = make_policy_fit(config, prior, graphdef, mesh)
    blocks = []
    if offline:
        demo_block = replay.from_episodes(offline, rows=len(offline), obs_keys=obs_keys)
        success = [ep["episode_metadata"]["success"] for ep in offline]
        blocks.append(Block.from_insert_block(demo_block, success, DEMOS, obs_keys))
    demo_size = sum(int(b.valid.sum()) for b in blocks)  # demonstrations come first in every dataset
    # One dataset shape for the whole run: everything the iterations can collect, at most.
    per_iteration = autonomous.num_envs * autonomous.length + corrected.num_envs * corrected.length
    capacity = demo_size + rc.iterations * per_iteration
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
    progress_log = IterationLog("recap", evaluator, run_dir / "metrics.jsonl")
    progress_log(with_beta(params, rc.guidance), 0, totals)
    bar = tqdm(range(1, rc.iterations + 1), desc=f"Recap {rc.task}/{rc.split} seed {seed}", unit="iter",
               disable=not progress)  # fmt: skip
    for iteration in bar:
        tic = time.perf_counter()
        collected, new_blocks = {}, []
        for name, collector in (("autonomous", autonomous), ("corrected", corrected)):
            if collector.num_envs == 0:
                continue
            key = jax.random.fold_in(jax.random.fold_in(key_collect, iteration), len(collected))
            out = collector(params, key, iteration)
            block, success = out["block"], out["success"]
            for k, v in patch.effort(block).items():
                totals[k] += v
            totals["collected_episodes"] += collector.num_envs
            collected[name] = float(np.mean(np.asarray(success)))
            new_blocks.append(Block.from_insert_block(block, success, ROLLOUTS, obs_keys))
        heldout = None
        if iteration > 1:  # the value fitted last iteration has not seen these episodes
            advantage_new = heldout_advantages(predict, value_params, new_blocks, targets)
            heldout = auroc(flat_steps(advantage_new, new_blocks), step_success(new_blocks))
        blocks += new_blocks

        examples = flat_examples(blocks, mc.chunk)
        examples["value_target"] = flat_steps([block_value_targets(b, targets) for b in blocks], blocks)
        examples["indicator"] = np.zeros(len(examples["chunk"]), np.int32)
        data = {**dataset.pad(examples, capacity), "demo_size": np.int32(demo_size)}
        value_params, value_metrics = fit_value(value_init if rc.from_prior else value_params, data, seed)
        values = unflatten(np.asarray(predict(value_params, data["obs"]))[: data["size"]], blocks)
        advantage = flat_steps([block_advantages(b, v, targets) for b, v in zip(blocks, values, strict=True)],
                               blocks)  # fmt: skip
        group = np.concatenate([np.full(int(b.valid.sum()), b.group) for b in blocks])
        forced = flat_steps([b.forced for b in blocks], blocks)
        fractions = {DEMOS: rc.demo_positive_fraction, ROLLOUTS: rc.positive_fraction}
        threshold = thresholds(advantage, group, ~forced, fractions)
        indicator = indicators(advantage, group, forced, threshold)
        data["indicator"][: data["size"]] = indicator
        params, policy_metrics = fit_policy(policy_init if rc.from_prior else params, data, seed)
        jax.block_until_ready(params)
        totals["wall_s"] += time.perf_counter() - tic
        rollout_steps = group == ROLLOUTS
        extra = {
            **{f"{k}_success": v for k, v in collected.items()},
            "dataset_steps": int(len(advantage)),
            "demo_steps": demo_size,
            "positive_share": float(np.mean(indicator == models.INDICATOR_POSITIVE)),
            "rollout_positive_share": float(np.mean(indicator[rollout_steps] == models.INDICATOR_POSITIVE)),
            "forced_positive_steps": int(forced.sum()),
            "thresholds": {str(k): v for k, v in threshold.items()},
            "advantage_auroc": auroc(advantage[rollout_steps], step_success(blocks)[rollout_steps]),
            "advantage_auroc_heldout": heldout,
            **value_metrics,
            **policy_metrics,
        }
        record = progress_log(with_beta(params, rc.guidance), iteration, totals, extra)
        bar.set_postfix(success=f"{record['success_rate']:.0%}", positive=f"{extra['positive_share']:.0%}",
                        auroc=f"{extra['advantage_auroc'] or 0:.2f}")  # fmt: skip
    return progress_log.records, params


def guidance_sweep(evaluator: evaluate.Evaluator, params, betas: tuple[float, ...]) -> dict[str, dict]:
    """The final policy on the evaluator's test contexts at each guidance weight beta: {str(beta): report}."""
    contexts = evaluate.TEST.with_episodes(evaluator.episodes)
    return {str(beta): evaluator.on(with_beta(params, beta), contexts) for beta in betas}
