"""Residual off-policy RL on a frozen prior: the learner policy patching runs by default.

The executed action is a = clip(b + scale * r, -1, 1), where b is the frozen prior's deterministic action
(the first of its chunk, as the deployment executes it) and r in [-1, 1] a one-step residual from a small
tanh-Gaussian policy that also reads b (ResFiT). The residual's head starts at zero, so before any update
the patched policy is exactly the prior.

Chunk semantics. The deployment runs the prior receding-horizon: every control step it predicts a chunk
and executes only its first action. The critic therefore scores what is executed, one step:
Q(s_t, a_t, b_t), with an n-step return over the replay's window (n = H, the window the replay already
stores):
    y = sum_{k<n} gamma^k r_{t+k} + gamma^n min_{2 of E} Q'(s_{t+n}, a'_{t+n}, b_{t+n}),
a'_{t+n} the residual actor's action at s_{t+n} (with `residual_select_target`, the action the selecting
policy would run there: the prior's or the patched one, as IBRL bootstraps). Nothing is scored that is
not executed, and the bootstrap action is one the policy would execute at s_{t+n}, not an open-loop
continuation of a sampled chunk.
The steps t+1 .. t+n-1 inside the return are the behaviour's (an uncorrected n-step bias, as in ResFiT's
n = 3): short enough that it matters less than propagating a sparse success 4 times faster.

The critic: an ensemble of 10 with LayerNorm, targets from the min over a random 2 (REDQ / RLPD), first
regressed onto Monte-Carlo returns of the offline data and the first round (`critic_pretrain_update`)
before any TD step, so the actor never follows a random critic. The actor maximises a pessimistic value,
mean - k * std over the ensemble, plus a BC term that fits the residual to (operator - prior) / scale on
operator data. A Polyak average of the actor is what is evaluated and deployed.

Every update is `update(state, batches, key, *, spec) -> (state, metrics)` like `learner.sac`, with the
same batches (`sac.draw_batches`) and a `sac.Spec` holding this module's `Networks`, so the replay,
sharding and fused-step plumbing are shared.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax import struct

from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import sac


@struct.dataclass
class ResidualState(sac.SACState):
    """SAC's state with `actor` the residual policy (`step` counts TD critic updates), plus the two below.
    A checkpoint stores fields by name, so the order of the fields does not matter to old checkpoints."""

    prior: nnx.State  # the base policy's params: no update changes them (carried so updates stay pure);
    # `patch.base` "hg_dagger" replaces them between rounds with the prior retrained by BC
    actor_average: nnx.State  # the residual's Polyak average: what is evaluated and deployed


@struct.dataclass
class Networks(sac.Networks):
    """SAC's static half with `actor` the residual policy, plus the frozen prior and the residual's scale."""

    prior: nnx.GraphDef = struct.field(pytree_node=False)
    scale: tuple[float, ...] = struct.field(pytree_node=False)  # per action dimension
    select: bool = struct.field(pytree_node=False, default=False)  # `select_action` at execution
    select_target: bool = struct.field(pytree_node=False, default=False)  # and in the TD target
    pessimism: float = struct.field(pytree_node=False, default=1.0)  # of the value `select_action` reads


def critic_model(model, config):
    """The ModelConfig of the residual's critic: the prior's sizes, `config.ensemble` members."""
    return dataclasses.replace(model, ensemble=config.ensemble)


def create_networks(prior, config, seed: int) -> tuple[Networks, nnx.State, nnx.State]:
    """Networks, fresh residual params and fresh critic params for a prior (`learner.pretrain.Prior`)."""
    if config.residual_select_target and not config.residual_select:
        raise ValueError(
            "sac.residual_select_target bootstraps from the selected action: it needs sac.residual_select"
        )
    model = prior.model
    actor_graphdef, actor = nnx.split(model.create_residual_policy(seed + 2), nnx.Param)
    critic_graphdef, critic = nnx.split(critic_model(model, config).create_action_critic(seed + 1), nnx.Param)
    nets = Networks(
        prior=prior.graphdef,
        actor=actor_graphdef,
        critic=critic_graphdef,
        stats=prior.stats,
        scale=action_scale(config, model.action_size),
        select=config.residual_select,
        select_target=config.residual_select_target,
        pessimism=config.pessimism,
    )
    return nets, actor, critic


def action_scale(config, action_size: int) -> tuple[float, ...]:
    """The residual's largest correction per action dimension: `residual_scale` on the motion, and
    `residual_valve_scale` on the last one, the suction valve. The valve's command is a sign (on above 0):
    a correction of 0.4 cannot open a valve the prior holds near -1. With 0.4 everywhere, 27% of the
    operator's takeover steps on `deploy` lie outside the residual's range; with 2 on the valve, 11%
    (`jaxvla reach`, docs/learner.md)."""
    return (config.residual_scale,) * (action_size - 1) + (config.residual_valve_scale,)


def make_optimizers(config) -> dict[str, optax.GradientTransformation]:
    return {**sac.make_optimizers(config), "actor": sac.make_optimizer(config.residual_actor_lr)}


def make_spec(config, model, nets: Networks) -> sac.Spec:
    """The spec of a residual learner on `model` (a `ModelConfig`: chunk length and action size)."""
    return sac.Spec(config, model.chunk, model.action_size, nets, make_optimizers(config))


def init_state(
    prior: nnx.State, actor: nnx.State, critic: nnx.State, init_alpha: float, optimizers: dict
) -> ResidualState:
    """SAC's fresh state for the residual, with the frozen prior and the residual's Polyak average."""
    fresh = sac.init_state(actor, critic, init_alpha, optimizers)
    fields = {field.name: getattr(fresh, field.name) for field in dataclasses.fields(fresh)}
    return ResidualState(prior=prior, actor_average=jax.tree.map(jnp.copy, actor), **fields)


# ------------------------------------------------------------------------------------------ forward
def base_action(nets: Networks, prior: nnx.State, obs: dict) -> jax.Array:
    """The prior's executed action [B, A]: the first of its deterministic chunk (obs normalised)."""
    mean, _ = models.apply(nets.prior, prior, obs)
    return jax.lax.stop_gradient(distributions.mode(mean)[:, 0])


def compose(base: jax.Array, residual: jax.Array, scale) -> jax.Array:
    """The executed action: base + scale * residual, kept in the action range. All [B, A]; scale [A] or
    a number."""
    return jnp.clip(base + jnp.asarray(scale) * residual, -1.0, 1.0)


def residual_target(executed: jax.Array, base: jax.Array, scale) -> jax.Array:
    """The residual that reproduces an executed action from the base, within the residual's range."""
    return jnp.clip((executed - base) / jnp.asarray(scale), -1.0, 1.0)


def residual_sample(nets: Networks, actor, obs: dict, base: jax.Array, key: jax.Array):
    """A reparameterised residual [B, A], its log-probability [B] and the policy's (mean, log_std).

    The exploration std is held at its initial e^-2 (x scale: 0.05 of the motion range): learned, Adam
    scales the entropy bonus's tiny gradients up to full steps and the std grew about e^1.2 per round in
    a pilot (entropy -2.4 -> +2.6 in two rounds), making the rollouts noisier and the train component
    worse, while only the mean is ever executed in evaluation."""
    mean, log_std = models.apply(nets.actor, actor, obs, base)
    log_std = jax.lax.stop_gradient(log_std)
    residual, log_prob = distributions.sample(key, mean[:, None], log_std[:, None])  # a chunk of one step
    return residual[:, 0], log_prob, (mean, log_std)


def residual_mode(nets: Networks, actor, obs: dict, base: jax.Array) -> jax.Array:
    mean, _ = models.apply(nets.actor, actor, obs, base)
    return distributions.mode(mean)


def q_values(nets: Networks, critic, obs: dict, action: jax.Array, base: jax.Array) -> jax.Array:
    return models.apply(nets.critic, critic, obs, action, base)  # [E, B]


def select_action(nets: Networks, critic, obs: dict, base: jax.Array, patched: jax.Array) -> jax.Array:
    """The patched action where the critic's pessimistic value rates it above the prior's own, the prior's
    elsewhere (IBRL's choice between a frozen prior and an RL actor). Off the data the ensemble disagrees,
    the lower bound falls, and the prior keeps the states it already handles. All [B, A]."""
    q = functools.partial(q_values, nets, critic, obs, base=base)
    return jnp.where(prefers_patched(nets, q(patched), q(base))[:, None], patched, base)


def prefers_patched(nets: Networks, patched_q: jax.Array, base_q: jax.Array) -> jax.Array:
    """[B] bool: where the ensemble's pessimistic value [E, B] rates the patched action above the prior's."""
    return pessimistic_value(patched_q, nets.pessimism) > pessimistic_value(base_q, nets.pessimism)


def act(nets: Networks, params: dict, obs: dict, key: jax.Array, *, explore: bool) -> jax.Array:
    """The patched policy on raw observations [B, ...] -> actions [B, A]. params: `deployable`.

    `explore` samples the residual (SAC's exploration), otherwise its mode."""
    obs = normalization.normalize(obs, nets.stats)
    base = base_action(nets, params["prior"], obs)
    if explore:
        residual, _, _ = residual_sample(nets, params["residual"], obs, base, key)
    else:
        residual = residual_mode(nets, params["residual"], obs, base)
    patched = compose(base, residual, nets.scale)
    return select_action(nets, params["critic"], obs, base, patched) if nets.select else patched


def actor_fn(nets: Networks, *, explore: bool = False):
    """`act` as an `evaluate.Actor`: (params, obs, key) -> action [B, A]."""
    return functools.partial(act, nets, explore=explore)


def deployable(nets: Networks, state: ResidualState) -> dict:
    """The params an actor runs: the prior and the Polyak-averaged residual, and the critic where the
    actor selects between the prior's action and the patched one."""
    params = {"prior": state.prior, "residual": state.actor_average}
    return {**params, "critic": state.critic} if nets.select else params


def correction_reach(executed: jax.Array, base: jax.Array, scale, mask: jax.Array) -> dict:
    """How much of the operator's correction a residual of `scale` can express, over masked steps.

    executed, base [N, A]; mask [N] (the operator's steps). Returns the share of steps whose correction
    (executed - base) / scale leaves [-1, 1] in some dimension, and the mean share of the correction's
    size that is lost to that clip: what no amount of training can teach the residual."""
    needed = (executed - base) / jnp.asarray(scale)
    reachable = jnp.clip(needed, -1.0, 1.0)
    weight = mask.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weight), 1.0)
    outside = jnp.any(jnp.abs(needed) > 1.0, axis=-1)
    size = jnp.linalg.norm(needed, axis=-1)
    lost = jnp.linalg.norm(needed - reachable, axis=-1) / jnp.maximum(size, 1e-6)
    return {
        "share_outside": jnp.sum(weight * outside) / count,
        "lost_fraction": jnp.sum(weight * lost) / count,
    }


# ------------------------------------------------------------------------------------------- losses
def pessimistic_value(q: jax.Array, pessimism: float) -> jax.Array:
    """mean - pessimism * std over the ensemble: q [E, B] -> [B]. A lower confidence bound, so the actor
    is not drawn to actions where the members disagree (where the critic has no data)."""
    return jnp.mean(q, axis=0) - pessimism * jnp.std(q, axis=0)


def residual_bc_loss(mean: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean squared error of the residual's mode against its target over masked samples. [B, A], [B]."""
    mask = mask.astype(jnp.float32)[:, None]
    count = jnp.maximum(jnp.sum(mask) * mean.shape[-1], 1.0)
    return jnp.sum(mask * (distributions.mode(mean) - target) ** 2) / count


def monte_carlo_returns(reward: np.ndarray, valid: np.ndarray, gamma: float) -> np.ndarray:
    """Discounted returns-to-go G_t = r_t + gamma G_{t+1} within each row's valid steps. [R, T] -> [R, T].

    A row holds one episode that ends at its last valid step (a time limit is a failure, value 0 after it,
    as the replay treats it); invalid steps get 0."""
    reward = np.where(valid, reward, 0.0).astype(np.float64)
    returns = np.zeros_like(reward)
    running = np.zeros(reward.shape[0])
    for t in range(reward.shape[1] - 1, -1, -1):
        running = np.where(valid[:, t], reward[:, t] + gamma * running, 0.0)
        returns[:, t] = running
    return returns.astype(np.float32)


# ------------------------------------------------------------------------------------------ updates
def critic_target(state: ResidualState, batch: dict, key: jax.Array, *, spec: sac.Spec) -> jax.Array:
    """The n-step TD target [B] (see the module docstring), under stop_gradient."""
    nets = spec.nets
    key_next, key_subset = jax.random.split(key)
    next_base = base_action(nets, state.prior, batch["next_obs"])
    next_residual, _, _ = residual_sample(nets, state.actor, batch["next_obs"], next_base, key_next)
    next_action = compose(next_base, next_residual, nets.scale)
    next_q = q_values(nets, state.target_critic, batch["next_obs"], next_action, next_base)
    if nets.select_target:
        next_q = selected_q(
            nets, next_q, q_values(nets, state.target_critic, batch["next_obs"], next_base, next_base)
        )
    target = sac.td_target(
        batch["reward"], batch["discount"], sac.ensemble_min(next_q, key_subset, spec.config.target_subset)
    )
    return jax.lax.stop_gradient(target)


def selected_q(nets: Networks, patched_q: jax.Array, base_q: jax.Array) -> jax.Array:
    """Each member's value [E, B] of the action `select_action` would pick: the patched one where the
    pessimistic value rates it above the prior's, the prior's elsewhere (IBRL's bootstrap)."""
    return jnp.where(prefers_patched(nets, patched_q, base_q)[None], patched_q, base_q)


def critic_regression(
    state: ResidualState,
    obs: dict,
    action: jax.Array,
    target: jax.Array,
    weight: jax.Array,
    *,
    spec: sac.Spec,
) -> tuple[ResidualState, jax.Array, jax.Array]:
    """One gradient step of every member towards `target` [B]; returns the state, loss and mean Q [B]."""
    base = base_action(spec.nets, state.prior, obs)

    def loss_fn(critic):
        q = q_values(spec.nets, critic, obs, action, base)
        return sac.critic_loss_value(q, target, weight), q

    critic, critic_opt, loss, q = sac.descend(
        state.critic, state.critic_opt, loss_fn, spec.optimizers["critic"]
    )
    return state.replace(critic=critic, critic_opt=critic_opt), loss, q


def critic_update(
    state: ResidualState, batch: dict, key: jax.Array, *, spec: sac.Spec
) -> tuple[ResidualState, dict]:
    """One TD step on a normalised replay batch (its executed action is chunk[:, 0]), then the target EMA."""
    target = critic_target(state, batch, key, spec=spec)
    state, loss, q = critic_regression(
        state, batch["obs"], batch["chunk"][:, 0], target, batch["weight"], spec=spec
    )
    state = state.replace(
        target_critic=sac.soft_update(state.target_critic, state.critic, spec.config.tau), step=state.step + 1
    )
    metrics = {
        "critic_loss": loss,
        "q": sac.weighted_mean(jnp.mean(q, axis=0), batch["weight"]),
        "q_std": sac.weighted_mean(jnp.std(q, axis=0), batch["weight"]),
        "target": sac.weighted_mean(target, batch["weight"]),
    }
    return state, metrics


def critic_pretrain_update(state: ResidualState, batch: dict, *, spec: sac.Spec) -> tuple:
    """One Monte-Carlo regression step: batch {obs (normalised), action [B, A], return [B], weight [B]}.
    The target critic follows the critic exactly, so TD starts from the pretrained values."""
    state, loss, _ = critic_regression(
        state, batch["obs"], batch["action"], batch["return"], batch["weight"], spec=spec
    )
    return state.replace(target_critic=state.critic), {"critic_pretrain_loss": loss}


def actor_update(
    state: ResidualState, batch: dict, key: jax.Array, *, spec: sac.Spec, enabled: jax.Array
) -> tuple[ResidualState, dict]:
    """One actor, temperature and actor-average step; `enabled` False (critic warm-up) changes nothing."""
    nets, config = spec.nets, spec.config
    alpha = jnp.exp(state.log_alpha)
    base = base_action(nets, state.prior, batch["obs"])
    is_bc = (
        jnp.isin(batch["source"], jnp.asarray(spec.bc_sources))
        & (batch["weight"] > 0)
        & batch["chunk_mask"][:, 0]
    )
    bc_target = residual_target(batch["chunk"][:, 0], base, nets.scale)

    def loss_fn(actor):
        residual, log_prob, (mean, _) = residual_sample(nets, actor, batch["obs"], base, key)
        q = q_values(nets, state.critic, batch["obs"], compose(base, residual, nets.scale), base)
        rl = sac.weighted_mean(alpha * log_prob - pessimistic_value(q, config.pessimism), batch["weight"])
        imitation = residual_bc_loss(mean, bc_target, is_bc)
        return rl + config.residual_bc_weight * imitation, (rl, imitation, log_prob, mean)

    target_entropy = config.residual_target_entropy_per_dim * spec.action_size
    new, metrics, mean = sac.policy_step(state, loss_fn, batch["weight"], target_entropy, spec)
    new["actor_average"] = sac.soft_update(state.actor_average, new["actor"], config.actor_polyak)
    metrics["residual_abs"] = jnp.mean(jnp.abs(distributions.mode(mean)))
    return sac.replaced_where(enabled, state, new), metrics


def update(
    state: ResidualState, batches: dict, key: jax.Array, *, spec: sac.Spec
) -> tuple[ResidualState, dict]:
    """`config.utd` TD critic updates in a scan, then one actor update, on normalised batches
    [utd + 1, B, ...] (`sac.draw_batches`)."""
    warmup = spec.config.residual_critic_warmup
    return sac.utd_update(critic_update, actor_update, state, batches, key, spec=spec, warmup=warmup)


def make_train_steps(spec: sac.Spec, *, num_steps: int, mesh):
    """`sac.make_train_steps` running this module's `update`."""
    return sac.make_train_steps(spec, num_steps=num_steps, mesh=mesh, update_fn=update)


# ------------------------------------------------------------------------------ critic pretraining
def returns_dataset(episodes: list[dict], blocks: list[dict], gamma: float, keys) -> dict[str, np.ndarray]:
    """Every step of RLDS `episodes` and of rollout `blocks` ([B, T] fields, `patch.episode_block`) as a
    flat regression set: {"obs": {k: [N, ...]} for k in `keys`, "action": [N, A] executed, "return": [N]
    Monte-Carlo}."""
    parts = []
    for episode in episodes:
        steps = episode["steps"]
        reward = np.asarray(steps["reward"], np.float32)[None]
        returns = monte_carlo_returns(reward, np.ones_like(reward, bool), gamma)[0]
        parts.append(
            (
                {k: np.asarray(steps["observation"][k]) for k in keys},
                np.asarray(steps["action"], np.float32),
                returns,
            )
        )
    for block in blocks:
        block = jax.device_get(block)
        valid = np.asarray(block["valid"], bool)
        returns = monte_carlo_returns(np.asarray(block["reward"]), valid, gamma)
        parts.append(
            (
                {k: np.asarray(block["obs"][k])[valid] for k in keys},
                np.asarray(block["action"], np.float32)[valid],
                returns[valid],
            )
        )
    if not parts:
        raise ValueError("no episodes or blocks to pretrain the critic on")
    return {
        "obs": {k: np.concatenate([p[0][k] for p in parts]) for k in keys},
        "action": np.concatenate([p[1] for p in parts]),
        "return": np.concatenate([p[2] for p in parts]),
    }


def pad_dataset(data: dict, capacity: int) -> dict:
    """The regression set padded with zero rows to `capacity`, with `size`: one compile per capacity."""
    size = len(data["return"])
    grow = lambda x: np.concatenate([x, np.zeros((capacity - size, *x.shape[1:]), x.dtype)])  # noqa: E731
    return {**jax.tree.map(grow, data), "size": np.int32(size)}


def critic_pretrain_steps(
    state: ResidualState, data: dict, key: jax.Array, *, spec: sac.Spec, num_steps: int, batch_size: int
) -> tuple[ResidualState, dict]:
    """`num_steps` Monte-Carlo regression steps in one scan on a padded `returns_dataset` (raw obs)."""

    def body(state, step):
        index = jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, data["size"])
        rows = jax.tree.map(lambda x: x[index], {k: v for k, v in data.items() if k != "size"})
        batch = {
            "obs": normalization.normalize(rows["obs"], spec.nets.stats),
            "action": rows["action"],
            "return": rows["return"],
            "weight": jnp.ones((batch_size,), jnp.float32),
        }
        return critic_pretrain_update(state, batch, spec=spec)

    state, metrics = jax.lax.scan(body, state, jnp.arange(num_steps))
    return state, {
        "critic_pretrain_loss_first": metrics["critic_pretrain_loss"][0],
        "critic_pretrain_loss_last": metrics["critic_pretrain_loss"][-1],
    }


def make_critic_pretrain(spec: sac.Spec):
    """`critic_pretrain_steps` jitted with the state donated, `config.critic_pretrain_steps` long."""
    config = spec.config
    fn = functools.partial(
        critic_pretrain_steps, spec=spec, num_steps=config.critic_pretrain_steps, batch_size=config.batch_size
    )
    return jax.jit(fn, donate_argnums=0)
