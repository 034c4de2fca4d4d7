"""RIPT-VLA: interactive post-training from binary success, by a group policy gradient in MJX.

One iteration, as in the paper's dynamic-sampling RLOO-PPO:
- contexts (initial states of the split, drawn once per run) are sampled, each replicated K times by
  `reset_from_params`; the K copies differ only in their observation noise and in the chunks the policy
  samples, so the group's spread of outcomes is the policy's own;
- the policy acts in action chunks: every H control steps it samples one chunk from its tanh-Gaussian and
  executes it, so a rollout is a sequence of chunk decisions whose log-probabilities the loss scores;
- the reward is binary success; each rollout's advantage is its reward minus the mean of the other K - 1
  rollouts of its group (leave-one-out);
- groups whose K outcomes agree carry no signal (every advantage is 0) and are rejected; a context whose
  last group all succeeded is skipped for a while; the rollout budget per iteration is fixed, so rejected
  groups cost environment steps but no update;
- `epochs` passes of the PPO-clipped objective over the kept decisions, with the sampling policy's
  log-probabilities fixed at the start of the iteration, plus a KL term to the run's starting policy;
  every kept rollout weighs the same, however many decisions it took.

The likelihood is made for RL: the network's mean with a separate, state-independent log-std per action
dimension that lives in RIPT's own params ({"policy": network params, "log_std": [A]}), starts well above
the BC floor and has its own floor. BC fits a near-deterministic operator, so the network's own std sits
at its floor (about e^-5); PPO's clip bounds a step's change of log pi, i.e. of z * dmu / sigma, so with
that std an iteration moves the mean by about 0.001, and its rollouts hardly explore. RIPT-VLA's
OpenVLA-OFT policies do the same with a clipped scale head sampled wider than its fit. (A token head
trained by cross-entropy would need a new head in `jaxvla/models` and a new BC fit; a std beside the
network changes neither, and the prior's mean, the thing BC did fit well, is kept.)

Everything on device is one jitted call per group batch (rollouts), one per iteration (updates).
"""

import dataclasses
import functools
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import envs
from configs import Config
from envs.rollout import freeze_when_done
from envs.rollout import rollout
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import evaluate
from learner.pretrain import IterationLog
from learner.pretrain import Prior


# ------------------------------------------------------------------------------------------ losses
def leave_one_out_advantage(rewards: jax.Array) -> jax.Array:
    """rewards [G, K] -> advantages [G, K]: R_k minus the mean of the group's other K - 1 rewards."""
    k = rewards.shape[-1]
    baseline = (jnp.sum(rewards, axis=-1, keepdims=True) - rewards) / (k - 1)
    return rewards - baseline


def informative_groups(rewards: jax.Array) -> jax.Array:
    """[G, K] -> [G] bool: the group's outcomes differ (a uniform group has all advantages 0)."""
    return jnp.any(rewards != rewards[..., :1], axis=-1)


def clipped_surrogate(
    log_prob: jax.Array,
    old_log_prob: jax.Array,
    advantage: jax.Array,
    weight: jax.Array,
    clip_low: float,
    clip_high: float,
) -> tuple[jax.Array, dict]:
    """PPO's clipped objective as a loss, the weighted mean over decisions (weight 0: left out). All [N].

    ratio = pi(c|s) / pi_old(c|s) for whole chunks c; loss = -min(ratio A, clip(ratio, 1 - low, 1 + high) A).
    With `rollout_weights` every rollout weighs the same.
    """
    ratio = jnp.exp(log_prob - old_log_prob)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_decision = -jnp.minimum(ratio * advantage, clipped * advantage)
    loss = weighted_mean(per_decision, weight)
    included = weight > 0
    return loss, {
        "ppo_loss": loss,
        "ratio": weighted_mean(ratio, included),
        "ratio_deviation": jnp.max(jnp.where(included, jnp.abs(ratio - 1.0), 0.0)),
        "clip_fraction": weighted_mean(ratio != clipped, included),
    }


def weighted_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
    """sum(w x) / sum(w) over [N]; 0 where every weight is 0."""
    weight = weight.astype(jnp.float32)
    return jnp.sum(x * weight) / jnp.maximum(jnp.sum(weight), 1e-12)


def gaussian_kl(
    mean: jax.Array, log_std: jax.Array, ref_mean: jax.Array, ref_log_std: jax.Array
) -> jax.Array:
    """KL(N(mean, std) || N(ref_mean, ref_std)) per dimension, elementwise [...]:
    log(ref_std / std) + (std^2 + (mean - ref_mean)^2) / (2 ref_std^2) - 1/2."""
    variance_ratio = jnp.exp(2.0 * (log_std - ref_log_std))
    gap = (mean - ref_mean) * jnp.exp(-ref_log_std)
    return ref_log_std - log_std + 0.5 * (variance_ratio + gap**2) - 0.5


def rollout_weights(decided: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """decided [R, D], kept [R] -> [R, D] decision weights: 1 / (decisions of its rollout) in kept
    rollouts, 0 elsewhere. The loss is then the mean over rollouts of each rollout's mean, so a failure
    that ran to the time limit does not outweigh a quick success by its length."""
    count = np.maximum(decided.sum(axis=1, keepdims=True), 1)
    return (decided & kept[:, None]) / count


# --------------------------------------------------------------------------------------- sampling
@dataclasses.dataclass(frozen=True)
class Likelihood:
    """RIPT's policy pi(c | s) = N(mean_theta(s), std) before the squash: the network's mean and a
    state-independent std per action dimension from the params' "log_std", clipped to
    [log floor, log ceiling] and scaled by `temperature`. Rollouts sample from it and the PPO ratio and
    the KL score it, so they compare like with like."""

    floor: float
    ceiling: float = 1.0
    temperature: float = 1.0

    def __call__(self, graphdef, params: dict, obs: dict, stats: dict) -> tuple[jax.Array, jax.Array]:
        """obs {k: [B, ...]} (raw) -> (mean, log_std) [B, H, A]. The network's own (BC) log-std is unused."""
        mean, _ = models.apply(graphdef, params["policy"], normalization.normalize(obs, stats))
        log_std = jnp.clip(params["log_std"], jnp.log(self.floor), jnp.log(self.ceiling))
        return mean, jnp.broadcast_to(log_std + jnp.log(self.temperature), mean.shape)


def rl_params(policy_params, action_size: int, std: float) -> dict:
    """RIPT's params: the network's and a fresh log-std [A] at `std` for every action dimension."""
    return {"policy": policy_params, "log_std": jnp.full((action_size,), jnp.log(std), jnp.float32)}


def mean_actor(graphdef, stats: dict) -> evaluate.Actor:
    """The evaluation actor on RIPT's params: the network's mean chunk, as every method is evaluated."""
    deterministic = evaluate.chunk_actor(graphdef, stats)
    return lambda params, obs, key: deterministic(params["policy"], obs, key)


def executed_log_prob(mean: jax.Array, log_std: jax.Array, chunk: jax.Array, execute: int) -> jax.Array:
    """log pi of the part of each pre-squash chunk [B, H, A] that was executed (its first `execute`
    actions) -> [B], up to the squash's parameter-free log-determinant.

    The unexecuted tail never reached the env, so it has no bearing on the reward; scoring it would only
    add noise to the gradient.
    """
    terms = distributions.pre_tanh_log_prob_terms(mean, log_std, chunk)
    return jnp.sum(terms[..., :execute, :], axis=(-2, -1))


class GroupCollector:
    """`groups` contexts x `group_size` rollouts, executed chunk by chunk: one jitted call.

    Returns per rollout [G * K]: obs {k: [G*K, D, ...]} and the pre-squash chunk [G*K, D, H, A] sampled
    at each decision,
    decided [G*K, D] (the decision happened before the episode ended), success and env_steps.
    """

    def __init__(
        self,
        task: str,
        split: str,
        groups: int,
        group_size: int,
        graphdef,
        stats: dict,
        *,
        execute: int,
        likelihood: Likelihood,
    ):
        self.env = envs.make(task, split)
        self.groups, self.group_size = groups, group_size
        decisions = -(-self.env.config.max_steps // execute)  # ceil: the time limit ends the last chunk
        env_step = self.env.step

        def execute_chunk(state, chunk_actions):
            """The pre-squash chunk's first `execute` actions, squashed, open loop; a finished episode
            stays frozen, its step count with it."""

            def body(state, action):
                new = env_step(state, action)
                new = dataclasses.replace(new, info={**new.info, "steps": state.info["steps"] + 1})
                return freeze_when_done(state, new), None

            return jax.lax.scan(body, state, jnp.tanh(chunk_actions[:execute]))[0]

        step = jax.vmap(execute_chunk)

        def run(params, contexts, key):
            key_reset, key_act = jax.random.split(key)
            replicated = jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), contexts)
            keys = jax.random.split(key_reset, groups * group_size)
            state = jax.vmap(self.env.reset_from_params)(keys, replicated)
            steps = jnp.zeros(keys.shape[:1], jnp.int32)
            state = dataclasses.replace(state, info={**state.info, "steps": steps})

            def policy(state, key):
                mean, log_std = likelihood(graphdef, params, state.obs, stats)
                return distributions.sample_pre_tanh(key, mean, log_std)  # squashed when executed

            last, record = rollout(step, policy, state, key_act, decisions, freeze=False)
            ended = record["done"] | record["truncated"]  # [D, B] after decision d
            decided = jnp.cumsum(ended, axis=0) - ended == 0
            rows = lambda x: jnp.swapaxes(x, 0, 1)  # noqa: E731
            return {
                "obs": jax.tree.map(rows, record["obs"]),
                "chunk": rows(record["action"]),
                "decided": rows(decided),
                "success": last.info["success"],
                "env_steps": last.info["steps"],
            }

        self._run = jax.jit(run)

    def __call__(self, params, contexts, key: jax.Array) -> dict:
        return self._run(params, contexts, key)


# --------------------------------------------------------------------------------------- contexts
class ContextPool:
    """The run's initial states, and which of them to skip because their last group all succeeded.

    Host-side bookkeeping (numpy): which contexts to roll out is decided between jitted calls.
    """

    def __init__(self, count: int, skip_rounds: int, seed: int):
        self.skip_until = np.zeros(count, np.int64)  # skipped while the iteration is below this
        self.skip_rounds = skip_rounds
        self.rng = np.random.default_rng(seed)

    def draw(self, n: int, iteration: int) -> np.ndarray:
        """n distinct contexts, preferring those not being skipped; [n] int."""
        active = np.flatnonzero(self.skip_until <= iteration)
        if len(active) >= n:
            return self.rng.choice(active, n, replace=False)
        skipped = np.flatnonzero(self.skip_until > iteration)
        extra = self.rng.choice(skipped, n - len(active), replace=False)
        return np.concatenate([self.rng.permutation(active), extra])

    def record(self, contexts: np.ndarray, rewards: np.ndarray, iteration: int) -> None:
        """rewards [G, K] of the groups rolled out from `contexts` [G]: all-success ones are skipped next."""
        solved = np.all(rewards > 0, axis=1)
        self.skip_until[contexts[solved]] = iteration + 1 + self.skip_rounds

    def skipped(self, iteration: int) -> int:
        return int(np.sum(self.skip_until > iteration))


def select(contexts, index: np.ndarray):
    """The contexts (Params with a leading [C] axis) at index [G]."""
    return jax.tree.map(lambda x: x[index], contexts)


# ------------------------------------------------------------------------------------------ update
def make_optimizer(learning_rate: float, std_learning_rate: float) -> optax.GradientTransformation:
    """Adam on RIPT's params, one learning rate for the network and its own for the log-std [A] (a
    handful of numbers that the network's small rate would never move)."""
    labels = lambda params: {"policy": jax.tree.map(lambda _: "policy", params["policy"]), "log_std": "std"}  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.multi_transform(
            {"policy": optax.adam(learning_rate), "std": optax.adam(std_learning_rate)}, labels
        ),
    )


def ppo_loss(
    params,
    batch: dict,
    ref_params,
    *,
    graphdef,
    stats: dict,
    likelihood: Likelihood,
    execute: int,
    clip: tuple[float, float],
    kl_coef: float,
) -> tuple[jax.Array, dict]:
    """The clipped surrogate plus kl_coef * KL(pi || pi_ref) to the run's starting policy, both the
    weighted mean over the batch's decisions. batch: obs {k: [B, ...]}, chunk [B, H, A], advantage,
    weight, old_log_prob [B], and optionally first [] (the update's first step)."""
    mean, log_std = likelihood(graphdef, params, batch["obs"], stats)
    ref_mean, ref_log_std = jax.lax.stop_gradient(likelihood(graphdef, ref_params, batch["obs"], stats))
    new = executed_log_prob(mean, log_std, batch["chunk"], execute)
    # The first step's params are pi_old itself, so its old log-probs are this very forward pass and the
    # ratio is 1 to the bit (computed apart they differ by ~1e-6 of rounding, which the clip would count).
    old = jnp.where(batch.get("first", False), jax.lax.stop_gradient(new), batch["old_log_prob"])
    surrogate, metrics = clipped_surrogate(new, old, batch["advantage"], batch["weight"], *clip)
    kl_terms = gaussian_kl(mean, log_std, ref_mean, ref_log_std)[..., :execute, :]
    kl = weighted_mean(jnp.sum(kl_terms, axis=(-2, -1)), batch["weight"])
    loss = surrogate + kl_coef * kl
    return loss, {**metrics, "kl": kl, "loss": loss, "std": jnp.mean(jnp.exp(log_std))}


def ppo_epochs(
    params,
    opt_state,
    data: dict,
    key: jax.Array,
    ref_params,
    *,
    graphdef,
    stats: dict,
    optimizer,
    likelihood: Likelihood,
    execute: int,
    epochs: int,
    minibatches: int,
    clip: tuple[float, float],
    kl_coef: float,
):
    """`epochs` passes over the iteration's decisions in shuffled minibatches. data: obs {k: [N, ...]},
    chunk [N, H, A], advantage [N], weight [N] (`rollout_weights`: 0 for rejected groups and steps after
    the end). Returns the params, the optimiser state and every step's metrics [epochs, minibatches].

    The sampling policy's log-probabilities are those of `params` as given (pi_psi <- pi_theta), so the
    first step's ratio is 1; `ref_params` is the policy the KL term holds the run near.

    The decisions stay a batch of this iteration's rollouts, not a draw from the sharded replay that PRO,
    Recap and patching read: PPO's ratio and leave-one-out advantage are only valid for rollouts of the
    policy that just sampled them (RIPT-VLA discards them after the update), so a replay would hold
    nothing that could be drawn again.
    """
    n = data["weight"].shape[0]
    size = n // minibatches

    def log_prob(params, obs, chunk):
        mean, log_std = likelihood(graphdef, params, obs, stats)
        return executed_log_prob(mean, log_std, chunk, execute)

    old_log_prob = jax.lax.stop_gradient(log_prob(params, data["obs"], data["chunk"]))
    loss_fn = functools.partial(
        ppo_loss,
        graphdef=graphdef,
        stats=stats,
        likelihood=likelihood,
        execute=execute,
        clip=clip,
        kl_coef=kl_coef,
    )

    def minibatch_step(carry, step):
        (params, opt_state), (index, first) = carry, step
        batch = jax.tree.map(lambda x: x[index], {**data, "old_log_prob": old_log_prob})
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, {**batch, "first": first}, ref_params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch(carry, step):
        key_epoch, first_epoch = step
        order = jax.random.permutation(key_epoch, n)[: minibatches * size].reshape(minibatches, size)
        first = first_epoch & (jnp.arange(minibatches) == 0)
        return jax.lax.scan(minibatch_step, carry, (order, first))

    steps = (jax.random.split(key, epochs), jnp.arange(epochs) == 0)
    (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), steps)
    return params, opt_state, metrics


def update_summary(metrics: dict) -> dict:
    """An iteration's PPO metrics [epochs, minibatches] -> the numbers its record shows: means over every
    step, the clip fraction of the last epoch, and the ratio's largest distance from 1."""
    metrics = jax.device_get(metrics)
    return {
        **{k: float(np.mean(v)) for k, v in metrics.items() if k != "ratio_deviation"},
        "last_epoch_clip_fraction": float(np.mean(metrics["clip_fraction"][-1])),
        "max_ratio_deviation": float(np.max(metrics["ratio_deviation"])),
    }


def decisions(rollouts: dict, advantage: np.ndarray, kept: np.ndarray) -> dict:
    """Rollouts [R, D, ...] (`GroupCollector` output stacked over calls), advantages and kept flags [R]
    -> the update's flat decisions [R * D, ...] with their weights (`rollout_weights`)."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    weight = rollout_weights(rollouts["decided"], kept)
    return {
        "obs": jax.tree.map(flat, rollouts["obs"]),
        "chunk": flat(rollouts["chunk"]),
        "advantage": flat(np.broadcast_to(advantage[:, None], weight.shape)).astype(np.float32),
        "weight": flat(weight).astype(np.float32),
    }


# -------------------------------------------------------------------------------------------- loop
def likelihood_of(config: Config) -> Likelihood:
    rc = config.ript
    return Likelihood(floor=rc.rl_std_floor, temperature=rc.temperature)


def run_ript(
    config: Config,
    prior: Prior,
    start_params,
    *,
    seed: int,
    collector: GroupCollector,
    evaluator: evaluate.Evaluator,
    contexts,
    run_dir: pathlib.Path,
    progress: bool = True,
) -> tuple[list[dict], nnx.State]:
    """RIPT from the network params `start_params` on `config.target.task`/`split`: one record per
    iteration (0: the start) and the final network params.

    `contexts` are the run's initial states (Params with a leading [C] axis); the collector (built with
    `likelihood_of(config)`) and the evaluator (the network's mean chunk, `evaluate.chunk_actor`) are
    built once by the caller and shared by every seed.
    """
    rc = config.ript
    per_call = collector.groups * collector.group_size
    calls = rc.rollouts_per_iteration // per_call
    optimizer = make_optimizer(rc.learning_rate, rc.std_learning_rate)
    update = jax.jit(
        functools.partial(
            ppo_epochs,
            graphdef=prior.graphdef,
            stats=prior.stats,
            optimizer=optimizer,
            likelihood=likelihood_of(config),
            execute=rc.execute,
            epochs=rc.epochs,
            minibatches=rc.minibatches,
            clip=(rc.clip_low, rc.clip_high),
            kl_coef=rc.kl_coef,
        ),
        donate_argnums=(0, 1),
    )
    reference = rl_params(start_params, prior.model.action_size, rc.rl_std)
    params = jax.tree.map(jnp.copy, reference)  # the update donates params; the reference stays
    opt_state = optimizer.init(params)
    pool = ContextPool(jax.tree.leaves(contexts)[0].shape[0], rc.skip_rounds, seed)
    key_roll, key_update, _ = jax.random.split(jax.random.key(seed), 3)  # the third once drew evaluations
    totals = {"env_steps": 0, "rollouts": 0, "kept_groups": 0, "groups": 0, "updates": 0, "wall_s": 0.0}
    progress_log = IterationLog("ript", evaluator, run_dir / "metrics.jsonl")
    progress_log(params["policy"], 0, totals)
    where = f"{config.target.task}/{config.target.split}"
    bar = tqdm(
        range(1, rc.iterations + 1), desc=f"RIPT {where} seed {seed}", unit="iter", disable=not progress
    )
    for iteration in bar:
        tic = time.perf_counter()
        outputs, rewards, counts = [], [], {"all_fail": 0, "all_success": 0}
        for call in range(calls):
            chosen = pool.draw(collector.groups, iteration)
            batch = select(contexts, chosen)
            out = jax.device_get(
                collector(params, batch, jax.random.fold_in(key_roll, iteration * calls + call))
            )
            group_rewards = out["success"].reshape(collector.groups, collector.group_size).astype(np.float32)
            pool.record(chosen, group_rewards, iteration)
            counts["all_fail"] += int(np.sum(np.all(group_rewards == 0, axis=1)))
            counts["all_success"] += int(np.sum(np.all(group_rewards > 0, axis=1)))
            outputs.append(out)
            rewards.append(group_rewards)
        rewards = np.concatenate(rewards)  # [calls * G, K]
        kept_groups = np.asarray(informative_groups(rewards))
        advantage = np.asarray(leave_one_out_advantage(rewards)).reshape(-1)
        kept = np.repeat(kept_groups, collector.group_size)
        rollouts = jax.tree.map(lambda *x: np.concatenate(x), *outputs)
        metrics = {}
        if kept.any():  # no informative group: nothing to learn from this budget
            data = decisions(rollouts, advantage, kept)
            params, opt_state, metrics = update(
                params, opt_state, data, jax.random.fold_in(key_update, iteration), reference
            )
            metrics = update_summary(metrics)
            totals["updates"] += 1
        totals["env_steps"] += int(np.sum(rollouts["env_steps"]))
        totals["rollouts"] += int(rewards.size)
        totals["kept_groups"] += int(np.sum(kept_groups))
        totals["groups"] += int(len(rewards))
        totals["wall_s"] += time.perf_counter() - tic
        extra = {
            "rollout_success": float(np.mean(rewards)),
            "groups_this_iteration": int(len(rewards)),
            "kept": int(np.sum(kept_groups)),
            "kept_fraction": float(np.mean(kept_groups)),
            **counts,
            "skipped_contexts": pool.skipped(iteration + 1),
            "rl_std": np.exp(np.asarray(params["log_std"])).round(4).tolist(),
            **metrics,
        }
        record = progress_log(params["policy"], iteration, totals, extra, changed=bool(kept.any()))
        bar.set_postfix(
            success=f"{record['success_rate']:.0%}",
            kept=f"{extra['kept_fraction']:.0%}",
            clip=f"{metrics.get('clip_fraction', 0.0):.2f}",
            rollout=f"{extra['rollout_success']:.0%}",
        )
    return progress_log.records, params["policy"]
