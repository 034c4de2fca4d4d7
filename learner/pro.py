"""The Process-Reward Operator: labels from logged episodes, training, evaluation, and its four uses.

Labels (per step, from an RLDS episode; `episode_labels`):
- the implicit reward r_hat: -time_cost every step (cycle time), -retry_cost per retry, -safety_cost per
  slip, drop or collision event, and at the last step +1 on success or -failure_cost otherwise (a
  timeout is a failure); the progress value's target is its discounted return from the step;
- done: the step ends the episode; success: the episode's outcome (q_t is trained at every step, so
  away from the end it reads as the completion likelihood);
- risk: the first failure a step within [t, t + horizon) announces (drop, slip, missed grasp, collision
  from the events; at a failed episode's last step its failure mode), or "none".
Comparisons (per pair of episodes, `preference`): success beats failure; between successes a stable
one (no slip, drop or missed grasp) beats a recovered one, then fewer retries, then faster by a margin.
A training example is a window of W steps ending at step t, plus a partner window at the same fraction
of another episode; the losses read the window's last step. Both are drawn from a sharded replay
(`fill_replay`: RLDS -> `replay.from_episodes` -> buffers, the labels stored per step at insertion), each
shard drawing its own pairs from its own slots.

Uses: `shaped_reward` (the operator's sparse reward plus potential-based shaping β(γΦ(s') - Φ(s)) from a
state-only PRO, for the patching learner; `refresh` fine-tunes PRO on the current policy's episodes),
`RiskTakeover` (the operator is called when a state-only PRO's ρ passes a threshold), `ranking_actor`
(the deterministic chunk and K - 1 sampled ones ranked by a conservatively trained action-conditioned
PRO, in MJX), `gate` (abort at a retry the termination head calls hopeless), `quality` (a score per
episode, for the fleet gate), and `score_episodes` (every step's readouts, for evaluation and plots).
"""

import dataclasses
import functools
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from flax import nnx

from configs import ProConfig
from envs import demos as operator_demos
from envs.cell import COLLISION
from envs.cell import DROP
from envs.cell import EVENTS
from envs.cell import MISSED_GRASP
from envs.cell import SLIP
from envs.cell import TIMEOUT
from envs.wrappers import History
from envs.wrappers import Takeover
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from jaxvla.models import heads
from jaxvla.models import pro as pro_model
from learner import bc
from learner import replay
from learner import sharding
from learner.checkpoints import Checkpoints
from learner.replay import LEARNED_REWARD

EVENT = {name: i for i, name in enumerate(EVENTS)}
SAFETY_EVENTS = [EVENT["slip"], EVENT["drop"], EVENT["collision"]]
UNSTABLE_EVENTS = [EVENT["slip"], EVENT["drop"], EVENT["missed_grasp"]]
# Failure classes a step's events announce; when one step has several, the first listed wins.
EVENT_FAILURES = (
    (DROP, EVENT["drop"]),
    (SLIP, EVENT["slip"]),
    (COLLISION, EVENT["collision"]),
    (MISSED_GRASP, EVENT["missed_grasp"]),
)
QUALITY = ("success", "stable", "retries", "cycle_time")  # columns of the per-episode quality table


# -------------------------------------------------------------------------------------------- labels
def discounted_returns(reward: np.ndarray, gamma: float) -> np.ndarray:
    out = np.empty_like(reward)
    acc = 0.0
    for t in range(len(reward) - 1, -1, -1):
        acc = reward[t] + gamma * acc
        out[t] = acc
    return out


def implicit_reward(events: np.ndarray, success: bool, pc: ProConfig) -> np.ndarray:
    """r_hat [T] from a step's events [T, N_EVENTS] and the outcome."""
    reward = np.full(len(events), -pc.time_cost, np.float32)
    reward -= pc.retry_cost * events[:, EVENT["retry"]]
    reward -= pc.safety_cost * events[:, SAFETY_EVENTS].any(axis=-1)
    reward[-1] += 1.0 if success else -pc.failure_cost
    return reward


def step_failures(events: np.ndarray, failure_mode: np.ndarray, success: bool) -> np.ndarray:
    """The failure class each step announces [T] (0: none)."""
    out = np.zeros(len(events), np.int32)
    for mode, event in reversed(EVENT_FAILURES):
        out = np.where(events[:, event], mode, out)
    if not success and out[-1] == 0:
        out[-1] = failure_mode[-1] if failure_mode[-1] else TIMEOUT
    return out


def first_within(classes: np.ndarray, horizon: int) -> np.ndarray:
    """[T]: the first nonzero class in [t, t + horizon), else 0."""
    padded = np.concatenate([classes, np.zeros(horizon, classes.dtype)])
    out = np.zeros_like(classes)
    for offset in range(horizon - 1, -1, -1):
        ahead = padded[offset : offset + len(classes)]
        out = np.where(ahead != 0, ahead, out)
    return out


def episode_labels(episode: dict, pc: ProConfig) -> dict[str, np.ndarray]:
    steps, meta = episode["steps"], episode["episode_metadata"]
    events = np.asarray(steps["events"], bool)
    success = bool(meta["success"])
    return {
        "return": discounted_returns(implicit_reward(events, success, pc), pc.gamma),
        "done": np.asarray(steps["is_last"], np.float32),
        "success": np.full(len(events), float(success), np.float32),
        "risk": first_within(step_failures(events, steps["failure_mode"], success), pc.risk_horizon),
    }


def episode_quality(episode: dict) -> np.ndarray:
    """[4]: success, stable (no slip, drop or missed grasp), retries, cycle time."""
    meta, events = episode["episode_metadata"], np.asarray(episode["steps"]["events"], bool)
    stable = not events[:, UNSTABLE_EVENTS].any()
    return np.array([meta["success"], stable, meta["retries"], meta["cycle_time"]], np.float32)


def preference(a: jax.Array, b: jax.Array, faster_margin: float) -> jax.Array:
    """+1 where episode a is better than b, -1 where worse, 0 where the comparisons do not decide.

    a, b [..., 4] quality rows. Stability, retries and speed only rank two successes.
    """
    both = (a[..., 0] > 0) & (b[..., 0] > 0)
    faster = b[..., 3] - a[..., 3]
    signs = [
        jnp.sign(a[..., 0] - b[..., 0]),
        jnp.where(both, jnp.sign(a[..., 1] - b[..., 1]), 0.0),
        jnp.where(both, jnp.sign(b[..., 2] - a[..., 2]), 0.0),
        jnp.where(both & (jnp.abs(faster) > faster_margin), jnp.sign(faster), 0.0),
    ]
    out = jnp.zeros_like(signs[0])
    for sign in reversed(signs):
        out = jnp.where(sign != 0, sign, out)
    return out


# -------------------------------------------------------------------------------------------- replay
def step_extras(episode: dict, pc: ProConfig) -> dict[str, np.ndarray]:
    """What the replay stores per step for PRO, computed once at insertion: the labels, the step's place
    in its episode (step, length) and its episode's quality row (for comparisons). All [T, ...]."""
    labels = episode_labels(episode, pc)
    steps = len(labels["return"])
    return {
        **labels,
        "risk": labels["risk"].astype(np.int32),
        "step": np.arange(steps, dtype=np.int32),
        "length": np.full(steps, steps, np.int32),
        "quality": np.broadcast_to(episode_quality(episode), (steps, len(QUALITY))).astype(np.float32),
    }


def extras_spec() -> dict[str, jax.ShapeDtypeStruct]:
    """`step_extras`' shapes and dtypes for one step, as `replay.create` takes them."""
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype)  # noqa: E731
    return {
        "return": scalar(jnp.float32),
        "done": scalar(jnp.float32),
        "success": scalar(jnp.float32),
        "risk": scalar(jnp.int32),
        "step": scalar(jnp.int32),
        "length": scalar(jnp.int32),
        "quality": jax.ShapeDtypeStruct((len(QUALITY),), jnp.float32),
    }


# The fresh buffer is donated.
_insert = jax.jit(replay.insert, static_argnames=("source",), donate_argnums=0)


def fill_replay(
    episodes: list[dict], pc: ProConfig, mesh, episodes_per_row: int = 8, capacity: int | None = None
) -> replay.Buffer:
    """The episodes in one sharded replay buffer with their labels, as PRO trains from it.

    Rows of about `episodes_per_row` episodes each, a multiple of the devices: every shard holds whole
    episodes. The buffer is just large enough for the block, so nothing is overwritten, or holds
    `capacity` slots, so that batches of episodes of any length train with one compiled program.
    """
    shards = mesh.shape[sharding.DATA]
    if len(episodes) < shards:
        raise ValueError(f"{len(episodes)} episodes cannot fill the {shards} shards of the replay")
    rows = shards * max(1, len(episodes) // (shards * episodes_per_row))
    keys = list(episodes[0]["steps"]["observation"])
    block = replay.from_episodes(episodes, rows, keys, [step_extras(ep, pc) for ep in episodes])
    obs_spec = {k: jax.ShapeDtypeStruct(v.shape[2:], v.dtype) for k, v in block["obs"].items()}
    if capacity is not None and capacity < block["valid"].size:
        raise ValueError(f"{block['valid'].size} steps do not fit a replay of {capacity}")
    # n_step 1: windows are drawn among all written slots; the n-step flags are for the critic's samples.
    buffer = replay.create(
        obs_spec, block["action"].shape[-1], capacity or block["valid"].size, mesh, extras_spec(), n_step=1
    )
    return _insert(buffer, block, source=replay.SOURCES.index("offline"))


def replay_windows(local: replay.Buffer, index: jax.Array, window: int, chunk: int) -> dict:
    """The model's windows of `window` steps ending at one shard's slots index [b], with t's labels.

    Returns obs {k: [b, W, ...]}, chunk [b, W, H, A] (each step's executed actions from it on, zeros past
    its episode's end), step [b, W], valid [b, W], and return, done, success, risk, quality of t.
    """
    steps = replay.gather_windows(local, index, window)
    # The chunks of the window's last steps reach up to chunk - 1 steps past t, within t's segment.
    later = jnp.arange(1, chunk)
    slots = (index[:, None] + later) % local.segment.shape[0]
    linked = later <= local.ahead[index][:, None].astype(jnp.int32)
    ahead = jnp.where(linked[..., None], local.action[slots], 0.0)  # [b, H-1, A]
    actions = jnp.concatenate([steps["action"], ahead], axis=1)  # [b, W+H-1, A]
    chunks = jnp.stack([actions[:, h : h + window] for h in range(chunk)], axis=2)
    return {
        "obs": steps["obs"],
        "chunk": chunks,
        "step": steps["step"],
        "valid": steps["mask"],
        **{k: steps[k][:, -1] for k in ("return", "done", "success", "risk", "quality")},
    }


def draw_pairs(
    local: replay.Buffer, key: jax.Array, pairs: int, *, window: int, chunk: int, faster_margin: float
) -> dict:
    """One shard's `pairs` comparisons: anchors ending at uniform slots, each followed by its partner, the
    step at the same fraction of the episode of another uniform slot (so partner episodes are drawn in
    proportion to their length). Windows [2 * pairs, ...] interleaved anchor, partner; preference [pairs]."""
    key_anchor, key_partner = jax.random.split(key)
    anchor = jax.random.randint(key_anchor, (pairs,), 0, jnp.maximum(local.count, 1))
    other = jax.random.randint(key_partner, (pairs,), 0, jnp.maximum(local.count, 1))
    extras = local.extras
    fraction = (extras["step"][anchor] + 0.5) / extras["length"][anchor]
    length = extras["length"][other]
    at = jnp.minimum(jnp.floor(fraction * length).astype(jnp.int32), length - 1)
    partner, stored = replay.step_in_segment(local, other, at - extras["step"][other])
    partner = jnp.where(stored, partner, other)  # that step was overwritten: the drawn one stands in
    windows = replay_windows(local, jnp.stack([anchor, partner], axis=1).reshape(-1), window, chunk)
    quality = windows.pop("quality").reshape(pairs, 2, len(QUALITY))
    windows["preference"] = preference(quality[:, 0], quality[:, 1], faster_margin)
    return windows


def sample_pairs(
    buffer: replay.Buffer, key: jax.Array, batch_size: int, *, window: int, chunk: int, faster_margin: float
) -> dict:
    """batch_size windows, half anchors and half partners, drawn shard-locally (`draw_pairs`): P("data").
    Pair i is rows 2i (anchor) and 2i + 1 (partner) on every shard, so also in the whole batch."""
    pairs = batch_size // 2 // buffer.shards
    if pairs * 2 * buffer.shards != batch_size:
        raise ValueError(f"batch size {batch_size} must be a multiple of twice the {buffer.shards} devices")
    draw = functools.partial(draw_pairs, pairs=pairs, window=window, chunk=chunk, faster_margin=faster_margin)
    return replay.on_every_shard(draw, buffer, key)


def is_heldout(episode_id: str, fraction: float) -> bool:
    """A stable split by a hash of the episode id: an episode stays on its side as the store grows."""
    return zlib.crc32(episode_id.encode()) % 1000 < fraction * 1000


def split_heldout(episodes: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out)."""
    held = {i for i, ep in enumerate(episodes) if is_heldout(ep["episode_metadata"]["episode_id"], fraction)}
    return [e for i, e in enumerate(episodes) if i not in held], [episodes[i] for i in sorted(held)]


# -------------------------------------------------------------------------------------------- losses
def apply(graphdef: nnx.GraphDef, params: nnx.State, stats: dict, batch: dict) -> dict:
    model = nnx.merge(graphdef, params)
    return model(normalization.normalize(batch["obs"], stats), batch["chunk"], batch["step"], batch["valid"])


def two_hot(x: jax.Array, support: jax.Array) -> jax.Array:
    """[...] scalars -> [..., bins]: the two neighbouring bins, weighted by distance (clipped to range)."""
    x = jnp.clip(x, support[0], support[-1])
    upper = jnp.clip(jnp.searchsorted(support, x, side="right"), 1, len(support) - 1)
    lo, hi = support[upper - 1], support[upper]
    w_hi = (x - lo) / (hi - lo)
    bins = jnp.arange(len(support))
    upper, w_hi = upper[..., None], w_hi[..., None]
    return (bins == upper - 1) * (1 - w_hi) + (bins == upper) * w_hi


def losses(logits: dict, batch: dict, support: jax.Array, pc: ProConfig) -> dict:
    """Every loss on the windows' last step: {name: scalar}. `logits` leaves are [B, W, ...]; rows 2i and
    2i + 1 are comparison pair i (anchor, partner), as `sample_pairs` lays them out."""
    last = {k: v[:, -1] for k, v in logits.items()}
    value_ce = optax.softmax_cross_entropy(last["value"], two_hot(batch["return"], support))
    value = heads.expected_value(last["value"], support)
    # A reshape, not a split in halves: each shard holds whole pairs, so no row crosses devices.
    anchor, partner = jnp.moveaxis(value.reshape(-1, 2), 1, 0)
    pref = batch["preference"]
    ranked = optax.sigmoid_binary_cross_entropy(pref * (anchor - partner) / pc.comparison_temperature, 1.0)
    decided = (pref != 0).astype(jnp.float32)
    return {
        "value": jnp.mean(value_ce),
        "done": jnp.mean(optax.sigmoid_binary_cross_entropy(last["done"], batch["done"])),
        "success": jnp.mean(optax.sigmoid_binary_cross_entropy(last["success"], batch["success"])),
        "risk": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(last["risk"], batch["risk"])),
        "comparison": jnp.sum(ranked * decided) / jnp.maximum(jnp.sum(decided), 1.0),
    }


def substitute_chunk(chunks: jax.Array, candidate: jax.Array) -> jax.Array:
    """A window's chunks [B, W, H, A] with the actions from its last step on replaced by `candidate`
    [B, H, A]: what the window would embed had the candidate been executed (as `window_from_history`)."""
    w, h = chunks.shape[1], chunks.shape[2]
    offset = jnp.arange(w)[:, None] - (w - 1) + jnp.arange(h)[None, :]  # [W, H]: candidate action index
    replaced = candidate[:, jnp.clip(offset, 0, h - 1)]  # [B, W, H, A]
    return jnp.where((offset >= 0)[None, :, :, None], replaced, chunks)


def out_of_data_chunks(key: jax.Array, logged: jax.Array, count: int, noise: float) -> jax.Array:
    """[B, count, H, A] chunks away from the data: half uniform in [-1, 1], half the logged chunk [B, H, A]
    plus Gaussian noise (clipped), the candidates a sampled policy proposes near its data."""
    key_uniform, key_noise = jax.random.split(key)
    half = count // 2
    b, h, a = logged.shape
    uniform = jax.random.uniform(key_uniform, (b, count - half, h, a), minval=-1.0, maxval=1.0)
    near = logged[:, None] + noise * jax.random.normal(key_noise, (b, half, h, a))
    return jnp.concatenate([uniform, jnp.clip(near, -1.0, 1.0)], axis=1)


def with_out_of_data_chunks(batch: dict, key: jax.Array, *, count: int, noise: float) -> dict:
    """bc.train_steps' `prepare`: the batch plus "other_chunks" [B, count, H, A] for the Cal-QL term."""
    return {**batch, "other_chunks": out_of_data_chunks(key, batch["chunk"][:, -1], count, noise)}


def calql_penalty(q_data: jax.Array, q_other: jax.Array, mc_return: jax.Array) -> jax.Array:
    """Cal-QL's conservative term: mean over examples of mean_i max(Q(s, a_i), G) - Q(s, a_data).

    q_data [B], q_other [N, B], mc_return G [B] (the logged discounted return). Values of chunks away from
    the data are pushed down only while above the return of the policy that logged the data, so they stay
    calibrated (Nakamoto et al. 2023), and the logged chunk's value is pushed up.
    """
    return jnp.mean(jnp.mean(jnp.maximum(q_other, mc_return), axis=0) - q_data)


def conservative_loss(params, batch, *, graphdef, stats, support) -> jax.Array:
    """The Cal-QL term for an action-conditioned PRO on the windows' last step; the batch carries
    "other_chunks" [B, N, H, A] (`with_out_of_data_chunks`)."""
    value = lambda chunks: heads.expected_value(  # noqa: E731
        apply(graphdef, params, stats, {**batch, "chunk": chunks})["value"][:, -1], support
    )
    others = jnp.moveaxis(batch["other_chunks"], 1, 0)  # [N, B, H, A]
    q_other = jax.vmap(lambda c: value(substitute_chunk(batch["chunk"], c)))(others)
    return calql_penalty(value(batch["chunk"]), q_other, batch["return"])


def pro_loss(params, batch, *, graphdef, stats, support, pc: ProConfig) -> tuple[jax.Array, dict]:
    terms = losses(apply(graphdef, params, stats, batch), batch, support, pc)
    total = terms["value"] + terms["done"] + terms["success"] + terms["risk"]
    total = total + pc.comparison_weight * terms["comparison"]
    if pc.conservative > 0:
        terms["conservative"] = conservative_loss(
            params, batch, graphdef=graphdef, stats=stats, support=support
        )
        total = total + pc.conservative * terms["conservative"]
    return total, {"loss": total, **terms}


# ------------------------------------------------------------------------------------------ training
@dataclasses.dataclass(frozen=True)
class Pro:
    """A trained PRO: network, params and the normalisation statistics it was trained with."""

    net: pro_model.ProNetConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: dict

    def outputs(self, batch: dict) -> dict:
        """Readouts {value, done, success, rho, risk} per step of batch (obs, chunk, step, valid)."""
        return pro_model.readouts(apply(self.graphdef, self.params, self.stats, batch), self.net.support())


def make_update(graphdef, stats, optimizer, pc: ProConfig, mesh):
    """One update on a given batch, jitted for a mesh: state replicated and donated, batch split along B.
    The pure update the data-parallel test compares across meshes; `make_train_steps` feeds it."""
    loss_fn = functools.partial(pro_loss, graphdef=graphdef, stats=stats, support=pc.net.support(), pc=pc)
    update_fn = functools.partial(bc.update, loss_fn=loss_fn, optimizer=optimizer)
    replicated = sharding.replicated(mesh)
    return jax.jit(
        update_fn,
        donate_argnums=0,
        in_shardings=(replicated, sharding.batch_sharded(mesh)),
        out_shardings=replicated,
    )


def make_train_steps(graphdef, stats, optimizer, pc: ProConfig, mesh=None):
    """The jitted block of `pc.log_every` updates on windows drawn from the replay (`fill_replay`): state
    replicated and donated, the buffer sharded as it is, every batch drawn shard-locally."""
    loss_fn = functools.partial(pro_loss, graphdef=graphdef, stats=stats, support=pc.net.support(), pc=pc)
    update_fn = functools.partial(bc.update, loss_fn=loss_fn, optimizer=optimizer)
    sample = functools.partial(
        sample_pairs, window=pc.net.window, chunk=pc.net.chunk, faster_margin=pc.faster_margin_s
    )
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(pc.batch_size, mesh)
    replicated = sharding.replicated(mesh)
    prepare = None
    if pc.conservative > 0:
        if not pc.net.action_input:
            raise ValueError("ProConfig.conservative needs an action-conditioned net (net.action_input)")
        prepare = functools.partial(
            with_out_of_data_chunks, count=pc.conservative_samples, noise=pc.conservative_noise
        )
    fn = functools.partial(
        bc.train_steps,
        num_steps=pc.log_every,
        batch_size=pc.batch_size,
        batch_sharding=sharding.batch_sharded(mesh),
        update_fn=update_fn,
        sample_fn=sample,
        prepare=prepare,
    )
    # The buffer keeps its own sharding (None): each shard's slots stay on their device.
    return jax.jit(
        fn, donate_argnums=0, in_shardings=(replicated, None, replicated), out_shardings=replicated
    )


def checkpoint_meta(pc: ProConfig, stats: dict) -> dict:
    return {"pro": dataclasses.asdict(pc), "net": pc.net.to_dict(), "stats": normalization.to_lists(stats)}


def load(run_dir: str | pathlib.Path) -> Pro:
    """The PRO saved in `run_dir` (its latest checkpoint)."""
    checkpoints = Checkpoints(pathlib.Path(run_dir) / "checkpoints")
    meta = checkpoints.restore_meta()
    net = pro_model.ProNetConfig.from_dict(meta["net"])
    graphdef, params = nnx.split(net.create(0), nnx.Param)
    state, _ = checkpoints.restore(bc.init_state(params, bc.make_optimizer(1.0, 1, 0, 0.0)))
    checkpoints.close()
    return Pro(net, graphdef, state.params, normalization.from_lists(meta["stats"]))


# ------------------------------------------------------------------------------------ whole episodes
def sequence_batch(obs: dict, actions: jax.Array, valid: jax.Array, chunk: int) -> dict:
    """Whole sequences (obs {k: [B, T, ...]}, executed actions [B, T, A], valid [B, T]) -> a model batch
    that scores every step at once (the band mask gives each step its own window)."""
    actions = jnp.where(valid[..., None], actions, 0.0)
    padded = jnp.concatenate([actions, jnp.zeros_like(actions[:, : chunk - 1])], axis=1)
    steps = actions.shape[1]
    chunks = jnp.stack([padded[:, i : i + steps] for i in range(chunk)], axis=2)
    step = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), valid.shape)
    return {"obs": obs, "chunk": chunks, "step": step, "valid": valid}


def pad_episodes(episodes: list[dict], length: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(obs {k: [B, length, ...]}, actions [B, length, A], valid [B, length]) with zeros past each end."""

    def pad(x):
        out = np.zeros((length, *x.shape[1:]), x.dtype)
        out[: len(x)] = x[:length]
        return out

    obs_keys = episodes[0]["steps"]["observation"].keys()
    obs = {k: np.stack([pad(ep["steps"]["observation"][k]) for ep in episodes]) for k in obs_keys}
    actions = np.stack([pad(ep["steps"]["action"]) for ep in episodes])
    valid = np.stack([np.arange(length) < len(ep["steps"]["action"]) for ep in episodes])
    return obs, actions, valid


@functools.cache
def readouts_program(net: pro_model.ProNetConfig, graphdef: nnx.GraphDef):
    """PRO's readouts of padded episodes, jitted once per network: params and statistics are arguments, so
    every PRO of that network (a refreshed one, each call's) reuses the program."""

    def run(params, stats, obs, actions, valid):
        return Pro(net, graphdef, params, stats).outputs(sequence_batch(obs, actions, valid, net.chunk))

    return jax.jit(run)


def score_episodes(pro: Pro, episodes: list[dict], *, length: int = 128, batch: int = 64) -> list[dict]:
    """Every step's readouts for each episode: [{value, done, success, rho, risk}] with [T] / [T, K]."""
    run = readouts_program(pro.net, pro.graphdef)
    out = []
    for i in range(0, len(episodes), batch):
        group = episodes[i : i + batch]
        group = group + [group[-1]] * (batch - len(group))  # one compiled shape
        readouts = jax.device_get(run(pro.params, pro.stats, *pad_episodes(group, length)))
        for b, ep in enumerate(episodes[i : i + batch]):
            n = len(ep["steps"]["action"])
            out.append({k: np.asarray(v[b, :n]) for k, v in readouts.items()})
    return out


# ---------------------------------------------------------------------------------------------- uses
def potential(readouts: dict, risk_weight: float) -> jax.Array:
    """Φ(s) [B, T] = V(s) - λ ρ(s) from a state-only PRO: risk enters the reward only as part of the
    potential, so it cannot change which policy is optimal (λ = 0: progress alone)."""
    return readouts["value"] - risk_weight * readouts["rho"]


def shaped_reward(
    sparse: jax.Array, phi: jax.Array, valid: jax.Array, terminal: jax.Array, *, gamma: float, beta: float
) -> jax.Array:
    """r'_t = r_t + β(γ Φ(s_{t+1}) - Φ(s_t)) over [B, T]; zero on padding.

    Φ is 0 after a step that ends its episode (`terminal`: the replay stores every end, time limits
    included, as terminal, so its critic never bootstraps past it either). Discounted over an episode the
    shaping terms telescope: the shaped return is the sparse one minus βΦ(s_0), the same offset for
    every policy from s_0, so the optimal policy is kept (Ng et al. 1999).
    """
    phi = jnp.where(valid, phi, 0.0)
    after = jnp.concatenate([phi[:, 1:], jnp.zeros_like(phi[:, :1])], axis=1)
    after = jnp.where(terminal, 0.0, after)
    return jnp.where(valid, sparse + beta * (gamma * after - phi), 0.0)


def window_from_history(history: dict, obs: dict, step: jax.Array, candidates: jax.Array) -> dict:
    """The window ending now, once per candidate chunk: a model batch [B*K, W].

    history (from envs.wrappers.History): obs {k: [B, W, ...]} and executed action [B, W, A] of the W
    previous steps, oldest first, valid [B, W]; obs {k: [B, ...]} now; step [B]; candidates [K, B, H, A].
    Step s of the window embeds the actions executed from s on: the recorded ones up to now, then the
    candidate's.
    """
    k, b, h, a = candidates.shape
    w = history["valid"].shape[1]
    window_obs = jax.tree.map(
        lambda past, now: jnp.concatenate([past[:, 1:], now[:, None]], axis=1), history["obs"], obs
    )
    past = jnp.broadcast_to(history["action"][None, :, 1:], (k, b, w - 1, a))
    sequence = jnp.concatenate([past, candidates], axis=2)  # [K, B, W-1+H, A]
    chunks = jnp.stack([sequence[:, :, i : i + w] for i in range(h)], axis=3)  # [K, B, W, H, A]
    valid = jnp.concatenate([history["valid"][:, 1:], jnp.ones((b, 1), bool)], axis=1)
    steps = step[:, None] - (w - 1) + jnp.arange(w)
    tile = lambda x: jnp.broadcast_to(x[None], (k, *x.shape)).reshape(k * b, *x.shape[1:])  # noqa: E731
    return {
        "obs": jax.tree.map(tile, window_obs),
        "chunk": chunks.reshape(k * b, w, h, a),
        "step": tile(steps),
        "valid": tile(valid),
    }


def candidate_chunks(key: jax.Array, mean: jax.Array, log_std: jax.Array, samples: int) -> jax.Array:
    """[K, B, H, A]: the policy's deterministic chunk first, then K - 1 sampled ones. With the
    deterministic chunk always among them, a scorer that prefers the policy's own choice cannot do worse
    than the policy (the V-GPS failure mode is sampled chunks scored over-optimistically)."""
    sampled = jax.vmap(lambda k: distributions.sample(k, mean, log_std)[0])(jax.random.split(key, samples))
    return sampled.at[0].set(distributions.mode(mean))


def ranking_scores(value: jax.Array, rho: jax.Array, *, risk_weight: float, margin: float) -> jax.Array:
    """[K, ...] candidate scores V - λρ, the deterministic candidate (index 0) credited `margin`: a sampled
    chunk replaces the policy's own only when PRO rates it higher by more than the margin."""
    return (value - risk_weight * rho).at[0].add(margin)


def ranking_actor(policy_graphdef, policy_stats: dict, pro: Pro, *, samples: int, risk_weight: float):
    """(params, env state, key) -> action [B, A]: the deterministic chunk and K - 1 sampled ones, scored by
    an action-conditioned PRO's V - λ rho at the current step (train it with `conservative` > 0: Cal-QL keeps
    chunks off the data from scoring high); executes the first action of the best (the env needs a History
    wrapper). params: `ranking_params`, so every margin runs one compiled program."""
    if not pro.net.action_input:
        raise ValueError("ranking needs an action-conditioned PRO (net.action_input)")

    def act(params, state, key):
        obs = normalization.normalize(state.obs, policy_stats)
        mean, log_std = models.apply(policy_graphdef, params["policy"], obs)
        candidates = candidate_chunks(key, mean, log_std, samples)
        batch = window_from_history(state.info["history"], state.obs, state.cell.step, candidates)
        out = pro.outputs(batch)
        value, rho = (out[k][:, -1].reshape(samples, -1) for k in ("value", "rho"))  # [K, B]
        score = ranking_scores(value, rho, risk_weight=risk_weight, margin=params["margin"])
        best = jnp.argmax(score, axis=0)
        return jnp.take_along_axis(candidates, best[None, :, None, None], axis=0)[0, :, 0]

    return act


def ranking_params(policy_params, margin: float) -> dict:
    """A `ranking_actor`'s params: the policy's and the margin credited to its deterministic chunk. An
    infinite margin always keeps the deterministic chunk: the policy alone."""
    return {"policy": policy_params, "margin": jnp.float32(margin)}


def sign_test(ranked: np.ndarray, policy: np.ndarray) -> float:
    """One-sided paired sign test on the same contexts: P(ranked wins at least this many of the contexts
    where the two disagree | both equally good). Contexts both win or both lose say nothing."""
    ranked, policy = np.asarray(ranked, bool), np.asarray(policy, bool)
    wins, losses = int(np.sum(ranked & ~policy)), int(np.sum(~ranked & policy))
    if wins + losses == 0:
        return 1.0
    return float(scipy.stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def sign_tests(outcomes: dict[float, np.ndarray]) -> dict[float, float]:
    """`sign_test` of every finite margin's per-context successes against the policy alone's (infinity)."""
    return {m: sign_test(won, outcomes[np.inf]) for m, won in outcomes.items() if np.isfinite(m)}


def choose_margin(outcomes: dict[float, np.ndarray], p: dict[float, float], level: float) -> float:
    """The margin to rank with, from per-context validation successes {margin: [contexts]} that include
    infinity (the policy alone) and their `sign_tests` p. A finite margin is chosen only when it beats the
    policy alone at `level`, Bonferroni-corrected over the margins tried; among those, the highest success,
    a tie going to the larger margin. Otherwise infinity: a gain the validation contexts cannot tell from
    noise does not displace the policy (one context of 32 once chose a margin that lost 6 points on test)."""
    better = [m for m, p_m in p.items() if p_m < level / max(len(p), 1)]
    return max(better, key=lambda m: (np.mean(outcomes[m]), m), default=np.inf)


def gate(readouts: dict, events: np.ndarray, min_success: float) -> int | None:
    """The step a retry gate would stop the episode at: the first retry event where q_t < min_success."""
    retries = np.flatnonzero(np.asarray(events)[:, EVENT["retry"]] & (readouts["success"] < min_success))
    return int(retries[0]) if len(retries) else None


def quality(readouts: dict, risk_weight: float) -> float:
    """Per-episode execution score: mean over steps of V - λ rho (higher is better)."""
    return float(np.mean(readouts["value"] - risk_weight * readouts["rho"]))


# ---------------------------------------------------------------------------------------- evaluation
def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (nan where either side is constant)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y).statistic)


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney)."""
    label = np.asarray(label, bool)
    pos, neg = label.sum(), (~label).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    r = scipy.stats.rankdata(score)
    return float((r[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration_error(prob: np.ndarray, label: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |mean prob - frequency| over equal-width bins."""
    prob, label = np.asarray(prob, float), np.asarray(label, float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.sum() * abs(prob[inside].mean() - label[inside].mean())
    return float(error / len(prob))


def lead_time(rho: np.ndarray, event_step: int, threshold: float) -> int:
    """Steps the alarm (rho > threshold) has been on without a break when the event happens at
    `event_step`: 0 if it is off then (the step's own output counts: it sees the action that drops)."""
    on = np.asarray(rho[: event_step + 1]) > threshold
    off = np.flatnonzero(~on)
    return int(event_step - off[-1]) if len(off) else event_step + 1


def evaluation(episodes: list[dict], readouts: list[dict], pc: ProConfig) -> dict:
    """Held-out figures: progress order, risk discrimination, calibration and lead time, termination."""
    labels = [episode_labels(ep, pc) for ep in episodes]
    success = np.array([bool(ep["episode_metadata"]["success"]) for ep in episodes])
    voc = [
        spearman(r["value"], np.arange(len(r["value"]))) for r, s in zip(readouts, success, strict=True) if s
    ]
    rho = np.concatenate([r["rho"] for r in readouts])
    at_risk = np.concatenate([lab["risk"] for lab in labels]) > 0
    done = np.concatenate([lab["done"] for lab in labels]) > 0
    d = np.concatenate([r["done"] for r in readouts])
    leads = []
    for ep, r in zip(episodes, readouts, strict=True):
        drops = np.flatnonzero(np.asarray(ep["steps"]["events"])[:, EVENT["drop"]])
        if len(drops):
            leads.append(lead_time(r["rho"], int(drops[0]), pc.risk_threshold))
    final_q = np.array([r["success"][-1] for r in readouts])
    scores = np.array([quality(r, pc.risk_weight) for r in readouts])
    implicit = np.array([lab["return"][0] for lab in labels])
    return {
        "episodes": len(episodes),
        "steps": int(len(rho)),
        "success_episodes": int(success.sum()),
        "value_order_correlation": {
            "mean": float(np.nanmean(voc)),
            "median": float(np.nanmedian(voc)),
            "episodes": len(voc),
        },
        "risk_auroc": auroc(rho, at_risk),
        "risk_positive_rate": float(at_risk.mean()),
        "risk_calibration_error": calibration_error(rho, at_risk),
        "drops": len(leads),
        "drop_lead_steps": {
            "median": float(np.median(leads)) if leads else None,
            "mean": float(np.mean(leads)) if leads else None,
            "warned": float(np.mean(np.array(leads) >= 2)) if leads else None,
        },
        "termination_accuracy": float(np.mean((d > 0.5) == done)),
        "termination_balanced_accuracy": float(0.5 * (np.mean(d[done] > 0.5) + np.mean(d[~done] <= 0.5))),
        "outcome_accuracy_at_end": float(np.mean((final_q > 0.5) == success)),
        "quality_vs_implicit_return_spearman": spearman(scores, implicit),
        "quality_success_auroc": auroc(scores, success),
    }


def gated_outcomes(episodes: list[dict], readouts: list[dict], min_success: float, hz: float) -> dict:
    """What retry gating would have done to each episode: stopped at the gate (a failure, shorter), or
    left alone. Returns per-episode success, cycle time and whether it was stopped."""
    success, cycle, stopped = [], [], []
    for ep, r in zip(episodes, readouts, strict=True):
        meta = ep["episode_metadata"]
        at = gate(r, ep["steps"]["events"], min_success)
        stopped.append(at is not None)
        success.append(bool(meta["success"]) and at is None)
        cycle.append((at + 1) / hz if at is not None else float(meta["cycle_time"]))
    return {"success": np.array(success), "cycle_time": np.array(cycle), "stopped": np.array(stopped)}


def check_state_only(pro_: Pro, use: str) -> None:
    if pro_.net.action_input:
        raise ValueError(
            f"{use} needs a state-only PRO (train it with --pro.net.no-action-input): an action-conditioned "
            "value is not a potential, and its risk needs the chunk about to run"
        )


def relabel(
    pro_: Pro, block: dict, success: jax.Array, *, gamma: float, beta: float, risk_weight: float
) -> dict:
    """A replay insert block [B, T] (learner.patch.episode_block) with the operator's sparse reward shaped
    by a state-only PRO's potential, marked as a learned reward."""
    del success  # the block's sparse reward already carries the verified outcome
    check_state_only(pro_, "shaping")
    batch = sequence_batch(block["obs"], block["action"], block["valid"], pro_.net.chunk)
    phi = potential(pro_.outputs(batch), risk_weight)
    reward = shaped_reward(block["reward"], phi, block["valid"], block["terminal"], gamma=gamma, beta=beta)
    return {**block, "reward": reward, "reward_source": jnp.full_like(block["reward_source"], LEARNED_REWARD)}


def relabel_episodes(
    pro_: Pro, episodes: list[dict], *, gamma: float, beta: float, risk_weight: float
) -> list[dict]:
    """RLDS episodes with their sparse `steps.reward` shaped the same way (the offline source, once).

    Shaped all at once, padded to the longest: one episode at a time, every new length compiled each
    eager op anew (some 600 one-op programs for the demo's 200 demonstrations)."""
    check_state_only(pro_, "shaping")
    if not episodes:
        return []
    readouts = score_episodes(pro_, episodes)
    lengths = np.array([len(ep["steps"]["reward"]) for ep in episodes])
    steps = np.arange(lengths.max())

    def padded(x) -> np.ndarray:
        return np.pad(np.asarray(x, np.float32), (0, steps.size - len(x)))

    sparse = np.stack([padded(ep["steps"]["reward"]) for ep in episodes])  # [E, T]
    phi = potential({k: np.stack([padded(r[k]) for r in readouts]) for k in ("value", "rho")}, risk_weight)
    valid, terminal = steps < lengths[:, None], steps == lengths[:, None] - 1
    reward = np.asarray(shaped_reward(sparse, phi, valid, terminal, gamma=gamma, beta=beta), np.float32)
    return [
        {**ep, "steps": {**ep["steps"], "reward": reward[i, :n]}}
        for i, (ep, n) in enumerate(zip(episodes, lengths, strict=True))
    ]


class Shaping:
    """PRO's dense reward for a patching run: relabels each round's insert block with a state-only PRO's
    potential (`relabel`), and refreshes PRO on the episodes the current policy produced. The params are an
    argument of the compiled relabelling, so a refreshed PRO reuses it.

    Transitions already in the replay keep the potential they were labelled with. Each episode is shaped by
    one potential throughout, so its shaped return is still its sparse return minus βΦ(s₀), but a refreshed
    run's replay mixes one potential per round, and with the critic's selection that cost 11 points on
    `deploy` against a frozen PRO (docs/pro.md): `pro.refresh_steps` is 0 by default.
    """

    def __init__(self, model: Pro, *, gamma: float, beta: float, risk_weight: float, mesh=None):
        check_state_only(model, "shaping")
        # A restored PRO, and the rollout's block, sit on one device; the shaped block joins a replay sharded
        # over the mesh, so both are put on the mesh first (the relabelling passes the block's other arrays
        # through where they were).
        self.placement = sharding.replicated(mesh) if mesh is not None else None
        self.model = model
        self.weights = {"gamma": gamma, "beta": beta, "risk_weight": risk_weight}

        def with_params(params, block):
            return relabel(dataclasses.replace(model, params=params), block, None, **self.weights)

        self._relabel = jax.jit(with_params)
        self._refresher = None  # built by the first refresh, reused by every later one

    @property
    def model(self) -> Pro:
        return self._model

    @model.setter
    def model(self, model: Pro) -> None:
        """Every PRO set (the restored one each run starts from, a refreshed one) goes to the mesh."""
        if self.placement is not None:
            model = dataclasses.replace(model, params=jax.device_put(model.params, self.placement))
        self._model = model

    def __call__(self, block: dict) -> dict:
        if self.placement is not None:
            block = jax.device_put(block, self.placement)
        return self._relabel(self.model.params, block)

    def episodes(self, episodes: list[dict]) -> list[dict]:
        """RLDS episodes (the offline source) shaped by the current PRO."""
        return relabel_episodes(self.model, episodes, **self.weights)

    def refresh(
        self, record: dict, task: str, version: int, pc: ProConfig, key: jax.Array, *, mesh=None
    ) -> dict:
        """Fine-tunes PRO on one round's rollout record (numpy [T, B]) for `pc.refresh_steps` steps, in a
        replay sized for a whole round, so every round trains with the same program. Returns its loss."""
        episodes = rollout_episodes(record, task, str(version))
        length, envs_ = np.asarray(record["done"]).shape
        if self._refresher is None:
            self._refresher = Refresher(self.model, pc, pc.refresh_steps, mesh)
        self.model, metrics = self._refresher(self.model, episodes, key, capacity=2 * envs_ * length)
        return {"pro_refresh_loss": metrics["loss"]}


def rollout_episodes(record: dict, task: str, version: str) -> list[dict]:
    """One RLDS episode per env of a rollout record (numpy [T, B]) of policy `version`; its source is "patch"
    if the operator acted in it, else "online"."""
    out = []
    for r in operator_demos.env_records(record):
        info = r["info"]
        source = "patch" if info["is_intervention"].any() else "online"
        out.append(
            operator_demos.episode_from_record(
                r,
                task,
                action=info["action"],
                policy_action=info["policy_action"],
                is_intervention=info["is_intervention"],
                metadata={"robot_id": "sim-0", "policy_version": version, "source": source},
            )
        )
    return out


class Refresher:
    """PRO fine-tuned on-policy: `steps` gradient steps (a bounded budget) on RLDS episodes of the current
    policy, in a replay of their own (`fill_replay`), from its current params, at
    `pc.optimizer.learning_rate` without warm-up. The normalisation statistics stay those PRO was trained
    with, so its inputs keep their meaning. Compiled once: every round's refresh reuses the program."""

    def __init__(self, pro_: Pro, pc: ProConfig, steps: int, mesh=None):
        # Cal-QL's term ranks chunks: a state-only PRO (shaping, risk) has none to push down.
        conservative = pc.conservative if pro_.net.action_input else 0.0
        self.pc = dataclasses.replace(
            pc, net=pro_.net, steps=steps, log_every=steps, conservative=conservative
        )
        self.mesh = mesh or sharding.make_mesh()
        self.optimizer = bc.make_optimizer(pc.optimizer.learning_rate, steps, 0, pc.optimizer.weight_decay)
        self._train = make_train_steps(pro_.graphdef, pro_.stats, self.optimizer, self.pc, self.mesh)
        replicated = sharding.replicated(self.mesh)

        # The donated train state gets buffers of its own (the copy); the params are placed before the
        # call, so PRO's from disk (round 1) and from the last refresh (later rounds) share one program.
        def start(params):
            return bc.init_state(jax.tree.map(jnp.copy, params), self.optimizer)

        self._start = jax.jit(start, out_shardings=replicated)
        self._replicated = replicated

    def __call__(
        self, pro_: Pro, episodes: list[dict], key: jax.Array, *, capacity: int | None = None
    ) -> tuple[Pro, dict]:
        """The refreshed PRO and its training metrics; a replay of `capacity` slots if given."""
        buffer = fill_replay(episodes, self.pc, self.mesh, capacity=capacity)
        state = self._start(jax.device_put(pro_.params, self._replicated))
        state, metrics = self._train(state, buffer, key)
        return dataclasses.replace(pro_, params=state.params), metrics


# ------------------------------------------------------------------------------------ risk trigger
def state_risk(pro_: Pro, history: dict, obs: dict, step: jax.Array) -> jax.Array:
    """ρ [B] now, from a state-only PRO over the window: History's info["history"] ([B, W] leaves), the
    observation now ({k: [B, ...]}) and the step [B]."""
    no_chunk = jnp.zeros((1, step.shape[0], pro_.net.chunk, pro_.net.action_size), jnp.float32)
    return pro_.outputs(window_from_history(history, obs, step, no_chunk))["rho"][:, -1]


class RiskTakeover(Takeover):
    """The operator protocol with PRO's risk as a predictive trigger: besides `trigger`'s own signs, the
    operator takes over when a state-only PRO's ρ (P(failure within Δ)) exceeds `threshold`. Wrap it in a
    History of PRO's window (History(RiskTakeover(env, ...), pro.net.window)): PRO reads that window.
    `info["rho"]` records each step's ρ. A trigger with every scripted sign off leaves risk alone."""

    def __init__(self, env, trigger, pro_: Pro, threshold: float, policy=None):
        super().__init__(env, trigger, policy)
        check_state_only(pro_, "the risk trigger")
        self.pro, self.threshold = pro_, threshold

    def _start(self, state):
        state = super()._start(state)
        return dataclasses.replace(state, info={**state.info, "rho": jnp.float32(0.0)})

    def step(self, state, policy_action: jax.Array):
        one = lambda x: jnp.asarray(x)[None]  # noqa: E731
        rho = state_risk(
            self.pro,
            jax.tree.map(one, state.info["history"]),
            jax.tree.map(one, state.obs),
            one(state.cell.step),
        )[0]
        predicted = rho > self.threshold
        if self.trigger.lookahead:
            predicted = predicted | self.predicted_failure(state)
        return self.take_step(state, policy_action, predicted, rho=rho)


def risk_takeover(pro_: Pro, threshold: float):
    """`(env, trigger, policy=None) -> env`: the takeover wrapper `learner.patch.Collector` builds, with
    ρ > threshold as one more trigger (History(RiskTakeover(...)), PRO's window kept outside it)."""

    def make(env, trigger, policy=None):
        return History(RiskTakeover(env, trigger, pro_, threshold, policy), pro_.net.window)

    return make
