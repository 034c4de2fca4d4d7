"""Behaviour cloning of action chunks: the loss, the state, and the pure update.

`train_steps(state, data, key)` runs `num_steps` updates in one `lax.scan`; each step draws its batch from
the device-resident dataset with `fold_in(key, step)`, so a run resumed from a checkpoint at step k draws
exactly the batches the uninterrupted run would have drawn.
"""

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from flax import struct
from jax.sharding import NamedSharding

from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import sharding


@struct.dataclass
class BCState:
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array  # [] int32; 2^31 updates is far beyond any run here


def make_optimizer(
    learning_rate: float, total_steps: int, warmup_steps: int, weight_decay: float, clip_norm: float = 1.0
) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup_steps, max(total_steps, warmup_steps + 1), learning_rate * 0.05
    )
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))


def init_state(params: nnx.State, optimizer: optax.GradientTransformation) -> BCState:
    return BCState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def chunk_loss(
    mean: jax.Array, log_std: jax.Array, chunk: jax.Array, mask: jax.Array, nll_weight: float
) -> tuple[jax.Array, dict]:
    """Masked chunk regression plus a likelihood term. mean, log_std, chunk [B, H, A]; mask [B, H].

    The squared error fits tanh(mean), the action the robot executes; the small negative log-likelihood
    term calibrates log_std, the exploration noise later RL fine-tuning samples from. Both are averaged
    over the unmasked action dimensions.
    """
    mask = mask.astype(jnp.float32)[..., None]
    count = jnp.maximum(jnp.sum(mask) * mean.shape[-1], 1.0)
    mse = jnp.sum(mask * (distributions.mode(mean) - chunk) ** 2) / count
    nll = -jnp.sum(mask * distributions.log_prob_terms(mean, log_std, chunk)) / count
    loss = mse + nll_weight * nll
    return loss, {"loss": loss, "mse": mse, "nll": nll, "std": jnp.mean(jnp.exp(log_std))}


def bc_loss(
    params: nnx.State, batch: dict, *, graphdef: nnx.GraphDef, stats: dict, nll_weight: float
) -> tuple[jax.Array, dict]:
    """batch: obs {k: [B, ...]} (raw; normalised here), chunk [B, H, A], mask [B, H], and for an
    advantage-conditioned policy (Recap) optionally indicator [B] int32."""
    obs = normalization.normalize(batch["obs"], stats)
    mean, log_std = models.apply(graphdef, params, obs, batch.get("indicator"))
    return chunk_loss(mean, log_std, batch["chunk"], batch["mask"], nll_weight)


def sample_batch(data: dict, key: jax.Array, batch_size: int) -> dict:
    """Uniform draw of `batch_size` examples from the flat dataset (with replacement).

    A dataset padded to a fixed capacity carries `size` [] int32 and only its first `size` rows are
    drawn, so a growing dataset (Recap's) keeps one shape and the update compiles once.
    """
    rows = data.get("size", data["chunk"].shape[0])
    return take_rows(data, jax.random.randint(key, (batch_size,), 0, rows))


def take_rows(data: dict, index: jax.Array) -> dict:
    """The examples at `index`, without the dataset's row counts (`size`, `focus`)."""
    return jax.tree.map(lambda x: x[index], {k: v for k, v in data.items() if k not in ("size", "focus")})


def focused_sampler(share: float):
    """A `sample_fn` that draws `share` of each batch from the focus rows, the rest from the others.

    The dataset carries `focus` [] int32, the row where the focus rows begin (they run to `size`): the
    operator's data appended after the offline demonstrations. Where there are rows of one kind only,
    every draw is uniform over them. `focus` is data, not a shape, so the update compiles once."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"the focus share must be in [0, 1), got {share}")

    def sample(data: dict, key: jax.Array, batch_size: int) -> dict:
        size, start = data["size"], data["focus"]
        focused = int(round(share * batch_size))
        key_rest, key_focus = jax.random.split(key)
        # With only one kind of row, both parts draw from all of them.
        rest = jax.random.randint(key_rest, (batch_size - focused,), 0, jnp.where(start > 0, start, size))
        focus = jax.random.randint(key_focus, (focused,), jnp.where(start < size, start, 0), size)
        return take_rows(data, jnp.concatenate([rest, focus]))

    return sample


def update(
    state: BCState, batch: dict, *, loss_fn, optimizer: optax.GradientTransformation
) -> tuple[BCState, dict]:
    grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads)}
    return BCState(params=params, opt_state=opt_state, step=state.step + 1), metrics


def train_steps(
    state: BCState,
    data: dict,
    key: jax.Array,
    *,
    num_steps: int,
    batch_size: int,
    batch_sharding: NamedSharding | None,
    update_fn,
    sample_fn=sample_batch,
    prepare=None,
) -> tuple[BCState, dict]:
    """`num_steps` updates in one scan; returns the new state and the metrics averaged over the block.

    `sample_fn(data, key, batch_size)` draws each step's batch. `prepare(batch, key)`, if given,
    transforms each drawn batch with a key of its own (Recap's indicator dropout); without it the draws
    are exactly those of earlier runs.
    """

    def body(state, _):
        key_batch = jax.random.fold_in(key, state.step)
        if prepare is not None:
            key_batch, key_prepare = jax.random.split(key_batch)
        batch = sample_fn(data, key_batch, batch_size)
        if prepare is not None:
            batch = prepare(batch, key_prepare)
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return update_fn(state, batch)

    state, metrics = jax.lax.scan(body, state, length=num_steps)
    return state, jax.tree.map(jnp.mean, metrics)


def make_train_steps(
    graphdef,
    stats,
    optimizer,
    *,
    num_steps: int,
    batch_size: int,
    nll_weight: float,
    mesh=None,
    prepare=None,
    sample_fn=sample_batch,
):
    """The jitted block of BC updates, with the state donated and (given a mesh) the batch sharded."""
    loss_fn = functools.partial(bc_loss, graphdef=graphdef, stats=stats, nll_weight=nll_weight)
    return make_loss_steps(
        loss_fn,
        optimizer,
        num_steps=num_steps,
        batch_size=batch_size,
        mesh=mesh,
        prepare=prepare,
        sample_fn=sample_fn,
    )


def make_loss_steps(
    loss_fn, optimizer, *, num_steps: int, batch_size: int, mesh=None, prepare=None, sample_fn=sample_batch
):
    """`make_train_steps` for any `loss_fn(params, batch) -> (loss, metrics)` over the flat dataset (a
    value function's cross-entropy, say)."""
    update_fn = functools.partial(update, loss_fn=loss_fn, optimizer=optimizer)
    batch_sharding = None
    jit_kwargs = {}
    if mesh is not None:
        sharding.check_batch_size(batch_size, mesh)
        batch_sharding = sharding.batch_sharded(mesh)
        replicated = sharding.replicated(mesh)
        jit_kwargs = {"in_shardings": (replicated, replicated, replicated), "out_shardings": replicated}
    fn = functools.partial(
        train_steps,
        num_steps=num_steps,
        batch_size=batch_size,
        batch_sharding=batch_sharding,
        update_fn=update_fn,
        sample_fn=sample_fn,
        prepare=prepare,
    )
    return jax.jit(fn, donate_argnums=0, **jit_kwargs)
