"""Soft actor-critic over action chunks: the RLPD / HIL-SERL recipe that policy patching runs.

The critic scores a whole chunk, Q(s_t, a_{t:t+H}), against an H-step return: the executed actions of a
replay window are a valid chunk whoever produced them (policy or operator), so no off-policy correction is
needed within the chunk. The actor is the pretrained tanh-Gaussian chunk policy; it maximises
E[Q(s, c)] + alpha H(pi(.|s)), plus a behaviour-cloning term on the operator's patch data.

`make_train_steps` fuses the update-to-data ratio into one jitted call: each train step draws its batches
on-device from the sharded replay (`draw_batches`), then `update` runs `utd` critic updates in a
`lax.scan` and one actor and temperature update. Every loss is a small pure function so tests can check
it against hand-computed values. The static settings (config, sizes, networks, optimisers) travel as one
`Spec`, which `learner.residual` builds for its own networks and shares the plumbing with.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct

from configs import SACConfig
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import bc
from learner import replay
from learner import sharding


@struct.dataclass
class SACState:
    actor: nnx.State
    critic: nnx.State
    target_critic: nnx.State
    log_alpha: jax.Array  # [] log of the entropy temperature
    actor_opt: optax.OptState
    critic_opt: optax.OptState
    alpha_opt: optax.OptState
    step: jax.Array  # [] int32 critic updates so far


@struct.dataclass
class Networks:
    """The static half of the learner: graph definitions and the normalisation every input goes through."""

    actor: nnx.GraphDef = struct.field(pytree_node=False)
    critic: nnx.GraphDef = struct.field(pytree_node=False)
    stats: dict = struct.field(pytree_node=False)


@dataclasses.dataclass(frozen=True, eq=False)
class Spec:
    """The static half of a learner, bound once: what every layer (the jitted block, the fused step, the
    update, the critic and actor steps) reads besides the state and the data.

    Hashable, so it can be a jit static argument. Equality is identity: the normalisation stats are arrays,
    which have no value hash, and a learner builds its spec once, so it compiles once.
    """

    config: SACConfig
    chunk: int  # H, the policy's chunk length: the length of the chunks drawn from the replay
    action_size: int
    nets: Networks  # `residual.Networks` for the residual learner
    optimizers: dict[str, optax.GradientTransformation]  # "actor", "critic", "alpha"

    @property
    def bc_sources(self) -> tuple[int, ...]:
        """The replay sources whose samples the actor also imitates, as indices into `replay.SOURCES`."""
        return tuple(replay.SOURCES.index(s) for s in self.config.bc_sources)


def make_optimizer(learning_rate: float, clip_norm: float = 10.0) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adam(learning_rate))


def make_optimizers(config: SACConfig) -> dict[str, optax.GradientTransformation]:
    return {
        "actor": make_optimizer(config.actor_lr),
        "critic": make_optimizer(config.critic_lr),
        "alpha": optax.adam(config.alpha_lr),
    }


def make_spec(config: SACConfig, model, nets: Networks) -> Spec:
    """The spec of a chunk-policy learner on `model` (a `ModelConfig`: chunk length and action size)."""
    return Spec(config, model.chunk, model.action_size, nets, make_optimizers(config))


def init_state(actor: nnx.State, critic: nnx.State, init_alpha: float, optimizers: dict) -> SACState:
    log_alpha = jnp.log(jnp.float32(init_alpha))
    return SACState(
        actor=actor,
        critic=critic,
        target_critic=jax.tree.map(jnp.copy, critic),
        log_alpha=log_alpha,
        actor_opt=optimizers["actor"].init(actor),
        critic_opt=optimizers["critic"].init(critic),
        alpha_opt=optimizers["alpha"].init(log_alpha),
        step=jnp.zeros((), jnp.int32),
    )


# ------------------------------------------------------------------------------------------------ losses
def ensemble_min(q: jax.Array, key: jax.Array, subset: int) -> jax.Array:
    """Pessimistic target over an ensemble q [E, B]: the min over all members (subset 0 or >= E), or
    REDQ's min over a random subset of `subset` members shared by the batch."""
    members = q.shape[0]
    if subset <= 0 or subset >= members:
        return jnp.min(q, axis=0)
    chosen = jax.random.choice(key, members, (subset,), replace=False)
    return jnp.min(q[chosen], axis=0)


def td_target(reward: jax.Array, discount: jax.Array, next_q: jax.Array) -> jax.Array:
    """y = R^(n) + gamma^n * min Q'(s_{t+n}, c'), with discount 0 past a terminal step. All [B]."""
    return reward + discount * next_q


def weighted_mean(x: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean over the batch (last axis) where empty-source samples (weight 0) do not count."""
    return jnp.sum(x * weight, axis=-1) / jnp.maximum(jnp.sum(weight), 1.0)


def critic_loss_value(q: jax.Array, target: jax.Array, weight: jax.Array) -> jax.Array:
    """Mean squared TD error over ensemble members and batch. q [E, B], target and weight [B]."""
    return jnp.mean(weighted_mean((q - target) ** 2, weight))


def actor_loss_value(q: jax.Array, log_prob: jax.Array, alpha: jax.Array, weight: jax.Array) -> jax.Array:
    """E[alpha log pi(c|s) - mean_e Q_e(s, c)] for chunks c drawn from the policy. q [E, B]."""
    return weighted_mean(alpha * log_prob - jnp.mean(q, axis=0), weight)


def temperature_loss_value(
    log_alpha: jax.Array, log_prob: jax.Array, target_entropy: float, weight: jax.Array
) -> jax.Array:
    """alpha grows while the policy's entropy (-log pi) is below the target, shrinks above it."""
    return -jnp.exp(log_alpha) * weighted_mean(jax.lax.stop_gradient(log_prob) + target_entropy, weight)


def soft_update(target, online, tau: float):
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


# ------------------------------------------------------------------------------------------- forward
def policy_sample(nets: Networks, actor, obs: dict, key: jax.Array):
    """Chunks drawn from pi(.|obs) [B, H, A], their log-probabilities [B], and the policy (mean, log_std)."""
    mean, log_std = models.apply(nets.actor, actor, obs)
    chunk, log_prob = distributions.sample(key, mean, log_std)
    return chunk, log_prob, (mean, log_std)


def q_values(nets: Networks, critic, obs: dict, chunk: jax.Array) -> jax.Array:
    return models.apply(nets.critic, critic, obs, chunk)  # [E, B]


# ------------------------------------------------------------------------------------------- updates
def descend(params, opt_state, loss_fn, optimizer) -> tuple:
    """One gradient step on `loss_fn(params) -> (loss, aux)`: (params, optimiser state, loss, aux)."""
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux


def temperature_step(
    state, log_prob: jax.Array, weight: jax.Array, target_entropy: float, optimizer
) -> tuple:
    """One step of the entropy temperature on the actor's log-probabilities [B]: (log_alpha, its optimiser
    state, the loss)."""
    loss, grad = jax.value_and_grad(temperature_loss_value)(state.log_alpha, log_prob, target_entropy, weight)
    update, alpha_opt = optimizer.update(grad, state.alpha_opt, state.log_alpha)
    return optax.apply_updates(state.log_alpha, update), alpha_opt, loss


def policy_step(
    state, loss_fn, weight: jax.Array, target_entropy: float, spec: Spec
) -> tuple[dict, dict, object]:
    """One actor step on `loss_fn(actor) -> (loss, (rl, imitation, log_prob [B], aux))`, then one temperature
    step on the log-probabilities. Returns the new fields (actor, actor_opt, log_alpha, alpha_opt), the
    metrics and `aux`."""
    actor, actor_opt, loss, (rl, imitation, log_prob, aux) = descend(
        state.actor, state.actor_opt, loss_fn, spec.optimizers["actor"]
    )
    log_alpha, alpha_opt, alpha_loss = temperature_step(
        state, log_prob, weight, target_entropy, spec.optimizers["alpha"]
    )
    new = {"actor": actor, "actor_opt": actor_opt, "log_alpha": log_alpha, "alpha_opt": alpha_opt}
    metrics = {
        "actor_loss": loss,
        "actor_rl": rl,
        "bc": imitation,
        "alpha": jnp.exp(state.log_alpha),
        "alpha_loss": alpha_loss,
        "entropy": -weighted_mean(log_prob, weight),
    }
    return new, metrics, aux


def replaced_where(enabled: jax.Array, state, new: dict):
    """`state` with the fields in `new` where `enabled`, its own values otherwise (the critic warm-up)."""
    old = {name: getattr(state, name) for name in new}
    return state.replace(**jax.tree.map(lambda n, o: jnp.where(enabled, n, o), new, old))


def critic_update(state: SACState, batch: dict, key: jax.Array, *, spec: Spec) -> tuple[SACState, dict]:
    """One critic step on a normalised batch, then the target EMA."""
    nets, config = spec.nets, spec.config
    key_next, key_subset = jax.random.split(key)
    next_chunk, _, _ = policy_sample(nets, state.actor, batch["next_obs"], key_next)
    next_q = q_values(nets, state.target_critic, batch["next_obs"], next_chunk)
    target = td_target(
        batch["reward"], batch["discount"], ensemble_min(next_q, key_subset, config.target_subset)
    )
    target = jax.lax.stop_gradient(target)

    def loss_fn(critic):
        q = q_values(nets, critic, batch["obs"], batch["chunk"])
        return critic_loss_value(q, target, batch["weight"]), q

    critic, critic_opt, loss, q = descend(state.critic, state.critic_opt, loss_fn, spec.optimizers["critic"])
    state = state.replace(
        critic=critic,
        critic_opt=critic_opt,
        target_critic=soft_update(state.target_critic, critic, config.tau),
        step=state.step + 1,
    )
    metrics = {
        "critic_loss": loss,
        "q": weighted_mean(jnp.mean(q, axis=0), batch["weight"]),
        "target": weighted_mean(target, batch["weight"]),
    }
    return state, metrics


def actor_update(
    state: SACState, batch: dict, key: jax.Array, *, spec: Spec, enabled: jax.Array
) -> tuple[SACState, dict]:
    """One actor and temperature step; `enabled` False (during critic warm-up) leaves both unchanged."""
    nets, config = spec.nets, spec.config
    alpha = jnp.exp(state.log_alpha)
    is_bc = jnp.isin(batch["source"], jnp.asarray(spec.bc_sources)) & (batch["weight"] > 0)
    bc_mask = batch["chunk_mask"] & is_bc[:, None]

    def loss_fn(actor):
        chunk, log_prob, (mean, log_std) = policy_sample(nets, actor, batch["obs"], key)
        q = q_values(nets, state.critic, batch["obs"], chunk)
        rl = actor_loss_value(q, log_prob, alpha, batch["weight"])
        imitation, _ = bc.chunk_loss(mean, log_std, batch["chunk"], bc_mask, config.nll_weight)
        return rl + config.bc_weight * imitation, (rl, imitation, log_prob, None)

    target_entropy = config.target_entropy_per_dim * spec.chunk * spec.action_size
    new, metrics, _ = policy_step(state, loss_fn, batch["weight"], target_entropy, spec)
    return replaced_where(enabled, state, new), metrics


def normalize_batch(batch: dict, stats: dict) -> dict:
    return {
        **batch,
        "obs": normalization.normalize(batch["obs"], stats),
        "next_obs": normalization.normalize(batch["next_obs"], stats),
    }


def utd_update(critic_step, actor_step, state, batches: dict, key: jax.Array, *, spec: Spec, warmup: int):
    """`spec.config.utd` critic steps in a scan on batches[:utd], then one actor step on batches[utd], held
    until the critic has taken more than `warmup` steps. Batches [utd + 1, B, ...]; the steps are
    `(state, batch, key, *, spec[, enabled]) -> (state, metrics)`. Critic metrics are averaged."""
    utd = spec.config.utd
    key_critic, key_actor = jax.random.split(jax.random.fold_in(key, state.step))
    critic_batches = jax.tree.map(lambda x: x[:utd], batches)
    state, critic_metrics = jax.lax.scan(
        lambda state, xs: critic_step(state, *xs, spec=spec),
        state,
        (critic_batches, jax.random.split(key_critic, utd)),
    )
    last = jax.tree.map(lambda x: x[utd], batches)
    state, actor_metrics = actor_step(state, last, key_actor, spec=spec, enabled=state.step > warmup)
    return state, {**jax.tree.map(jnp.mean, critic_metrics), **actor_metrics}


def update(state: SACState, batches: dict, key: jax.Array, *, spec: Spec) -> tuple[SACState, dict]:
    """One train step on given normalised batches with a leading [utd + 1] axis: `config.utd` critic
    updates in a scan, then one actor and temperature update on the last batch.

    This is the pure update the data-parallel tests compare across device meshes and processes;
    `train_steps` feeds it from the replay.
    """
    return utd_update(
        critic_update, actor_update, state, batches, key, spec=spec, warmup=spec.config.critic_warmup
    )


def mix_ratios(config: SACConfig) -> dict[str, float]:
    """`config.mix` by source name, as `replay.sample_mixed` takes it."""
    return dict(zip(replay.SOURCES, config.mix, strict=True))


def draw_batches(buffers: dict, key: jax.Array, *, spec: Spec, batch_sharding=None) -> dict:
    """`config.utd + 1` normalised mixed batches [utd + 1, B, ...] drawn on-device from the replay, each
    sample of its buffer's n-step, laid out by `batch_sharding` (None: wherever XLA puts them).

    Vectorised over the batches: one gather per field for the whole train step, not one per batch (a loop
    of small gathers is latency-bound, on a GPU above all). The batches are those of drawing each key alone.
    """
    config = spec.config

    def draw(key):
        batch = replay.sample_mixed(
            buffers, mix_ratios(config), key, config.batch_size, chunk=spec.chunk, gamma=config.gamma
        )
        batch = normalize_batch(batch, spec.nets.stats)
        return jax.lax.with_sharding_constraint(batch, batch_sharding) if batch_sharding else batch

    return jax.vmap(draw)(jax.random.split(key, config.utd + 1))


def train_steps(
    state, data, key: jax.Array, *, spec: Spec, num_steps: int, update_fn=update, draw_fn=draw_batches
):
    """`num_steps` fused train steps in one scan, each drawing its batches from `data` (`draw_fn`; the
    replay's buffers for `draw_batches`) and then running `update_fn` on them; metrics averaged over the
    block."""

    def body(state, _):
        key_batches, key_update = jax.random.split(jax.random.fold_in(key, state.step))
        return update_fn(state, draw_fn(data, key_batches, spec=spec), key_update, spec=spec)

    state, metrics = jax.lax.scan(body, state, length=num_steps)
    return state, jax.tree.map(jnp.mean, metrics)


def make_train_steps(spec: Spec, *, num_steps: int, mesh, update_fn=update):
    """The jitted block: state donated and replicated, replay sharded along capacity, batches along data.
    `update_fn`: `update`, or the residual learner's."""
    config = spec.config
    sharding.check_batch_size(config.batch_size, mesh)
    replay.mix_counts(mix_ratios(config), config.batch_size, mesh.size)  # fail here, not after compiling
    draw = functools.partial(draw_batches, batch_sharding=sharding.batch_sharded(mesh))
    fn = functools.partial(train_steps, spec=spec, num_steps=num_steps, update_fn=update_fn, draw_fn=draw)
    replicated = sharding.replicated(mesh)
    return jax.jit(fn, donate_argnums=0, out_shardings=(replicated, replicated))


def make_update(spec: Spec, mesh):
    """`update` jitted for a mesh: state replicated and donated, batches [utd + 1, B, ...] split along B."""
    replicated = sharding.replicated(mesh)
    batches = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA))
    return jax.jit(
        functools.partial(update, spec=spec),
        donate_argnums=0,
        in_shardings=(replicated, batches, replicated),
        out_shardings=(replicated, replicated),
    )
