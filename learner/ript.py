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
  log-probabilities fixed at the start of the iteration.

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


def clipped_surrogate(log_prob: jax.Array, old_log_prob: jax.Array, advantage: jax.Array, weight: jax.Array,
                      clip_low: float, clip_high: float) -> tuple[jax.Array, dict]:  # fmt: skip
    """PPO's clipped objective as a loss, averaged over decisions with weight > 0. All [N].

    ratio = pi(c|s) / pi_old(c|s) for whole chunks c; loss = -min(ratio A, clip(ratio, 1 - low, 1 + high) A).
    """
    ratio = jnp.exp(log_prob - old_log_prob)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_decision = -jnp.minimum(ratio * advantage, clipped * advantage)
    total = jnp.maximum(jnp.sum(weight), 1.0)
    loss = jnp.sum(per_decision * weight) / total
    clip_fraction = jnp.sum((ratio != clipped) * weight) / total
    return loss, {"ppo_loss": loss, "ratio": jnp.sum(ratio * weight) / total, "clip_fraction": clip_fraction}


# --------------------------------------------------------------------------------------- sampling
def scaled_policy(graphdef, params, obs: dict, stats: dict, temperature: float):
    """(mean, log_std) [B, H, A] of the policy whose std is `temperature` times the network's: the policy
    RIPT both samples from and differentiates, so the PPO ratio compares like with like."""
    mean, log_std = models.apply(graphdef, params, normalization.normalize(obs, stats))
    return mean, log_std + jnp.log(temperature)


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

    def __init__(self, task: str, split: str, groups: int, group_size: int, graphdef, stats: dict, *,
                 execute: int, temperature: float):  # fmt: skip
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
                mean, log_std = scaled_policy(graphdef, params, state.obs, stats, temperature)
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
def ppo_epochs(params, opt_state, data: dict, key: jax.Array, *, graphdef, stats: dict, optimizer,
               temperature: float, execute: int, epochs: int, minibatches: int,
               clip: tuple[float, float]):  # fmt: skip
    """`epochs` passes over the iteration's decisions in shuffled minibatches. data: obs {k: [N, ...]},
    chunk [N, H, A], advantage [N], weight [N] (0 for rejected groups and steps after the end).

    The sampling policy's log-probabilities are those of `params` as given (pi_psi <- pi_theta).
    """
    n = data["weight"].shape[0]
    size = n // minibatches

    def log_prob(params, obs, chunk):
        mean, log_std = scaled_policy(graphdef, params, obs, stats, temperature)
        return executed_log_prob(mean, log_std, chunk, execute)

    old_log_prob = jax.lax.stop_gradient(log_prob(params, data["obs"], data["chunk"]))

    def loss_fn(params, batch):
        new = log_prob(params, batch["obs"], batch["chunk"])
        return clipped_surrogate(new, batch["old_log_prob"], batch["advantage"], batch["weight"], *clip)

    def minibatch_step(carry, index):
        params, opt_state = carry
        batch = jax.tree.map(lambda x: x[index], {**data, "old_log_prob": old_log_prob})
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    def epoch(carry, key_epoch):
        order = jax.random.permutation(key_epoch, n)[: minibatches * size].reshape(minibatches, size)
        return jax.lax.scan(minibatch_step, carry, order)

    (params, opt_state), metrics = jax.lax.scan(epoch, (params, opt_state), jax.random.split(key, epochs))
    return params, opt_state, jax.tree.map(jnp.mean, metrics)


def decisions(rollouts: dict, advantage: np.ndarray, kept: np.ndarray) -> dict:
    """Rollouts [R, D, ...] (`GroupCollector` output stacked over calls), advantages and kept flags [R]
    -> the update's flat decisions [R * D, ...] with their weights."""
    flat = lambda x: x.reshape(-1, *x.shape[2:])  # noqa: E731
    weight = rollouts["decided"] & kept[:, None]
    return {
        "obs": jax.tree.map(flat, rollouts["obs"]),
        "chunk": flat(rollouts["chunk"]),
        "advantage": flat(np.broadcast_to(advantage[:, None], weight.shape)).astype(np.float32),
        "weight": flat(weight).astype(np.float32),
    }


# -------------------------------------------------------------------------------------------- loop
def run_ript(config: Config, prior: Prior, start_params, *, seed: int, collector: GroupCollector,
             evaluator: evaluate.Evaluator, contexts, run_dir: pathlib.Path,
             progress: bool = True) -> tuple[list[dict], nnx.State]:  # fmt: skip
    """RIPT from `start_params` on `config.ript.task`/`split`: one record per iteration (0: the start)
    and the final params.

    `contexts` are the run's initial states (Params with a leading [C] axis); the collector and the
    evaluator are built once by the caller and shared by every seed.
    """
    rc = config.ript
    per_call = collector.groups * collector.group_size
    calls = rc.rollouts_per_iteration // per_call
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(rc.learning_rate))
    update = jax.jit(functools.partial(
        ppo_epochs, graphdef=prior.graphdef, stats=prior.stats, optimizer=optimizer,
        temperature=rc.temperature, execute=rc.execute, epochs=rc.epochs, minibatches=rc.minibatches,
        clip=(rc.clip_low, rc.clip_high),
    ), donate_argnums=(0, 1))  # fmt: skip
    params = jax.tree.map(jnp.copy, start_params)
    opt_state = optimizer.init(params)
    pool = ContextPool(jax.tree.leaves(contexts)[0].shape[0], rc.skip_rounds, seed)
    key_roll, key_update, _ = jax.random.split(jax.random.key(seed), 3)  # the third once drew evaluations
    totals = {"env_steps": 0, "rollouts": 0, "kept_groups": 0, "updates": 0, "wall_s": 0.0}
    progress_log = IterationLog("ript", evaluator, run_dir / "metrics.jsonl")
    progress_log(params, 0, totals)
    bar = tqdm(range(1, rc.iterations + 1), desc=f"RIPT {rc.task}/{rc.split} seed {seed}", unit="iter",
               disable=not progress)  # fmt: skip
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
                params, opt_state, data, jax.random.fold_in(key_update, iteration)
            )
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            totals["updates"] += 1
        totals["env_steps"] += int(np.sum(rollouts["env_steps"]))
        totals["rollouts"] += int(rewards.size)
        totals["kept_groups"] += int(np.sum(kept_groups))
        totals["wall_s"] += time.perf_counter() - tic
        extra = {"rollout_success": float(np.mean(rewards)), "groups": int(len(rewards)),
                 "kept": int(np.sum(kept_groups)), **counts, "skipped_contexts": pool.skipped(iteration + 1),
                 **metrics}  # fmt: skip
        record = progress_log(params, iteration, totals, extra, changed=bool(kept.any()))
        bar.set_postfix(success=f"{record['success_rate']:.0%}", kept=extra["kept"],
                        rollout=f"{extra['rollout_success']:.0%}")  # fmt: skip
    return progress_log.records, params
