"""Device-resident replay for off-policy actor-critic over action chunks: one ring buffer per data source.

A `Buffer` is a pytree whose arrays have leading axes [D, C]: D shards along the mesh's `data` axis, C slots
per shard. Each shard's slots are a ring of consecutive steps. `insert` hands every shard its rows of a
rollout block and the shard appends them at its own write position; `sample` draws every shard's part of
the batch from its own slots. Both run under `shard_map`, so nothing crosses devices: a batch of B samples
comes out sharded along `data` exactly as the learner consumes it.

Per-step fields: obs {key: [...]}, action [A], reward, terminal, segment, sampleable and provenance
(version, intervention, reward_source, source). `segment` ids group slots into runs of consecutive steps
of one episode; an n-step window or an action chunk never crosses a segment boundary. A time-limit
truncation is stored as terminal on purpose: in the workcell the time limit is the failure mode "timeout",
so the value after it is 0 and no observation after the last step is needed.

`extras` are per-step fields a learner names at `create` and fills at `insert`: labels computed when the
episode is inserted (PRO's progress return and risk class, Recap's value target) or written back later for
every slot at once (Recap's advantage indicator, `map_slots`). Samples and windows carry them beside the
fixed fields.

`sampleable[t]` is decided at insert: the n-step window from t is complete, either because a terminal step
ends it or because the observation n steps later is stored in the same segment. Sampling draws only such
slots, so a target never bootstraps from a step that was not recorded. The buffer fixes n when it is
created (`Buffer.n_step`), and `insert` and `sample` both read it there, so the flags an insert sets are
always the ones a draw needs.

Sampling is O(1) per draw: `table` lists each shard's sampleable slots in the order they were written, as a
ring of its own (`table_head`, `table_count`). Slots are overwritten oldest-first and their flags never
change while stored, so the entries an insert removes are always the table's oldest and the ones it adds
go at its end: an insert touches only the entries of the slots it writes, and a draw is one lookup.
"""

import functools
from collections.abc import Iterable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxvla.schema import SOURCES
from learner.sharding import DATA

# `ahead` is stored in int8: a sample may look at most this many steps past its start.
AHEAD_CAP = 127
OPERATOR_REWARD, LEARNED_REWARD = 0, 1  # values of `reward_source`: sparse env / operator label, PRO model

# What `gather` and `gather_windows` return besides extras: an extra may not take one of these names.
SAMPLE_FIELDS = frozenset(
    (
        "obs",
        "chunk",
        "chunk_mask",
        "reward",
        "discount",
        "next_obs",
        "version",
        "intervention",
        "reward_source",
        "source",
        "weight",
    )
)
WINDOW_FIELDS = frozenset(("obs", "action", "reward", "terminal", "intervention", "mask", "weight"))

BLOCK_FIELDS = (
    "action",
    "reward",
    "terminal",
    "valid",
    "is_first",
    "intervention",
    "version",
    "reward_source",
)


@struct.dataclass
class Buffer:
    """One source's ring buffer. Arrays [D, C, ...] sharded P("data"); counters [D], one per shard.

    Inside `shard_map` (and in `gather`) the same class holds one shard's view: arrays [C, ...], scalars.
    """

    obs: dict[str, jax.Array]  # {key: [D, C, ...]}
    action: jax.Array  # [D, C, A] f32, the executed action
    reward: jax.Array  # [D, C] f32
    terminal: jax.Array  # [D, C] bool, the episode ended at this step (time limits included)
    segment: jax.Array  # [D, C] int32, -1 where never written
    sampleable: jax.Array  # [D, C] bool, an n-step sample may start here
    ahead: jax.Array  # [D, C] int8, later steps of the slot's segment, capped at AHEAD_CAP
    table: jax.Array  # [D, C] int32, sampleable slots oldest first, a ring from table_head
    version: jax.Array  # [D, C] int32, params version that acted
    intervention: jax.Array  # [D, C] bool, the operator's action was executed
    reward_source: jax.Array  # [D, C] int8, OPERATOR_REWARD or LEARNED_REWARD
    source: jax.Array  # [D, C] int8, index into SOURCES
    extras: dict[str, jax.Array]  # {name: [D, C, ...]}, per-step fields named at `create`
    pos: jax.Array  # [D] int32, next slot to write
    count: jax.Array  # [D] int32, slots written, saturating at C (written slots are 0 .. count-1)
    next_segment: jax.Array  # [D] int32; one id per segment, 2^31 segments is far beyond any run
    table_head: jax.Array  # [D] int32, table index of the oldest sampleable slot
    table_count: jax.Array  # [D] int32, sampleable slots (table entries in use)
    mesh: Mesh = struct.field(pytree_node=False)
    n_step: int = struct.field(pytree_node=False)  # the n of every sample, fixed at `create`

    @property
    def shards(self) -> int:
        return self.mesh.shape[DATA]

    @property
    def capacity(self) -> int:
        """Slots over the whole mesh, D * C."""
        return self.shards * self.segment.shape[-1]


# ---------------------------------------------------------------------------------------------- create
def create(
    obs_spec: dict[str, jax.ShapeDtypeStruct],
    action_size: int,
    capacity: int,
    mesh: Mesh,
    extras_spec: dict[str, jax.ShapeDtypeStruct] | None = None,
    *,
    n_step: int,
) -> Buffer:
    """An empty buffer of `capacity` slots over the mesh, whose samples are `n_step`-step transitions.
    obs_spec and extras_spec: name -> shape and dtype of ONE step."""
    extras_spec = extras_spec or {}
    if not 1 <= n_step <= AHEAD_CAP + 1:
        raise ValueError(f"n_step must lie in 1..{AHEAD_CAP + 1} (what `ahead` can hold), got {n_step}")
    taken = set(extras_spec) & (SAMPLE_FIELDS | WINDOW_FIELDS)
    if taken:
        raise ValueError(f"extras {sorted(taken)} would shadow fields that samples and windows already have")
    shards = mesh.shape[DATA]
    if capacity <= 0 or capacity % shards:
        raise ValueError(
            f"capacity {capacity} must be a positive multiple of the {shards} devices of the mesh"
        )
    empty = _empty_buffer(
        tuple(obs_spec.items()), action_size, capacity // shards, mesh, tuple(extras_spec.items()), n_step
    )
    return empty()


@functools.cache
def _empty_buffer(obs_spec: tuple, action_size: int, slots: int, mesh: Mesh, extras_spec: tuple, n_step: int):
    """The jitted constructor of one kind of empty buffer, built once: every buffer of the same spec (each
    seed's, each round's) reuses its program. Specs are (name, ShapeDtypeStruct) pairs."""
    shards = mesh.shape[DATA]

    def empty() -> Buffer:
        def zeros(shape, dtype):
            return jnp.zeros((shards, slots, *shape), dtype)

        counter = jnp.zeros((shards,), jnp.int32)
        return Buffer(
            obs={k: zeros(s.shape, s.dtype) for k, s in obs_spec},
            action=zeros((action_size,), jnp.float32),
            reward=zeros((), jnp.float32),
            terminal=zeros((), jnp.bool_),
            segment=jnp.full((shards, slots), -1, jnp.int32),
            sampleable=zeros((), jnp.bool_),
            ahead=zeros((), jnp.int8),
            table=zeros((), jnp.int32),
            version=zeros((), jnp.int32),
            intervention=zeros((), jnp.bool_),
            reward_source=zeros((), jnp.int8),
            source=zeros((), jnp.int8),
            extras={k: zeros(s.shape, s.dtype) for k, s in extras_spec},
            pos=counter,
            count=counter,
            next_segment=counter,
            table_head=counter,
            table_count=counter,
            mesh=mesh,
            n_step=n_step,
        )

    # Built by a jit with sharded outputs, so a large buffer never sits whole on one device.
    return jax.jit(empty, out_shardings=NamedSharding(mesh, P(DATA)))


def create_all(
    obs_spec: dict[str, jax.ShapeDtypeStruct],
    action_size: int,
    capacities: dict[str, int],
    mesh: Mesh,
    *,
    n_step: int,
) -> dict[str, Buffer]:
    """One buffer per source named in `capacities` (each one of SOURCES), all of `n_step`-step samples."""
    unknown = set(capacities) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown sources {sorted(unknown)}; expected names from {SOURCES}")
    return {
        name: create(obs_spec, action_size, capacity, mesh, n_step=n_step)
        for name, capacity in capacities.items()
    }


def memory_bytes(buffer: Buffer) -> int:
    """Bytes of all arrays, over all devices."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(buffer))


def shard_view(buffer: Buffer, shard: int) -> Buffer:
    """Shard `shard`'s slots as a Buffer of [C, ...] arrays and scalar counters (for tests and inspection)."""
    return jax.tree.map(lambda x: x[shard], buffer)


def _local(buffer: Buffer) -> Buffer:
    """Inside shard_map a shard sees [1, C, ...]; drop the unit axis."""
    return jax.tree.map(lambda x: x[0], buffer)


def _global(buffer: Buffer) -> Buffer:
    return jax.tree.map(lambda x: x[None], buffer)


# ---------------------------------------------------------------------------------------------- insert
def _shift(x: jax.Array, lag: int, fill) -> jax.Array:
    """x [R, T] moved `lag` steps later along time, `fill` entering at the start of each row."""
    if lag >= x.shape[1]:
        return jnp.full_like(x, fill)
    return jnp.concatenate([jnp.full_like(x[:, :lag], fill), x[:, :-lag]], axis=1)


def intervention_keep(valid, is_first, terminal, intervention, n_step: int) -> jax.Array:
    """[R, T] bool: valid steps that are an intervention or follow one by at most n_step steps of its episode.

    The trailing steps complete the n-step targets of the last intervention steps of a takeover.
    """
    episode = jnp.cumsum(is_first | _shift(terminal, 1, False), axis=1)
    acted = intervention & valid
    keep = acted
    for lag in range(1, n_step + 1):
        keep = keep | (_shift(acted, lag, False) & (_shift(episode, lag, -1) == episode))
    return keep & valid


def segment_bounds(keep, is_first, terminal, row_length: int) -> tuple[jax.Array, jax.Array]:
    """Where the segments of a flat row-major stream start and end. All [N] with N = rows * row_length.

    Returns (start, last): `start` marks kept steps that begin a segment (episode start, row start, after a
    dropped step, after a terminal step); `last` is the index of the last step of each kept step's segment.
    Segments never cross a row, so a segment is whole within one insert.
    """
    index = jnp.arange(keep.shape[0])
    previous_kept = jnp.concatenate([jnp.zeros((1,), bool), keep[:-1]])
    previous_terminal = jnp.concatenate([jnp.zeros((1,), bool), terminal[:-1]])
    start = keep & (is_first | (index % row_length == 0) | ~previous_kept | previous_terminal)
    next_start = jnp.concatenate([start[1:], jnp.ones((1,), bool)])
    next_kept = jnp.concatenate([keep[1:], jnp.zeros((1,), bool)])
    end = keep & (next_start | ~next_kept)
    # Index of the segment's last step: the nearest end at or after each step.
    last = jax.lax.cummin(jnp.where(end, index, keep.shape[0] - 1), axis=0, reverse=True)
    return start, last


def stream_layout(keep, is_first, terminal, row_length: int, n_step: int) -> tuple[jax.Array, jax.Array]:
    """Segments and sampleable flags of a flat row-major stream. All [N] with N = rows * row_length.

    Returns (start, sampleable): `start` as `segment_bounds`. A kept step is sampleable when its segment ends
    with a terminal step (every window from it stops there) or goes on for n_step more steps (the bootstrap
    step t + n_step is stored).
    """
    start, last = segment_bounds(keep, is_first, terminal, row_length)
    return start, _sampleable(keep, terminal, last, n_step)


def _sampleable(keep, terminal, last, n_step: int) -> jax.Array:
    """[N] bool: kept steps whose segment ends in a terminal step or goes on for n_step more steps."""
    return keep & ((last - jnp.arange(keep.shape[0]) >= n_step) | terminal[last])


def _updated_table(local: Buffer, slot: jax.Array, added: jax.Array, rank: jax.Array) -> dict:
    """The sample table after writing the stream's steps to `slot` [N] (C or more where not written).

    added [N] bool: written steps that are sampleable, in write order; rank [N]: their order among them.
    The written slots are the ring's oldest (or never written), so the sampleable ones among them are the
    table's first entries: dropping them is advancing the head. Cost O(N), whatever C.
    """
    capacity = local.segment.shape[0]
    removed = jnp.sum(local.sampleable.at[slot].get(mode="fill", fill_value=False), dtype=jnp.int32)
    head = (local.table_head + removed) % capacity
    kept = local.table_count - removed
    # Out of range where not added (dropped), distinct like the slots.
    entry = jnp.where(added, (head + kept + rank) % capacity, capacity + jnp.arange(slot.shape[0]))
    return {
        "table": local.table.at[entry].set(slot, mode="drop", unique_indices=True),
        "table_head": head,
        "table_count": kept + jnp.sum(added, dtype=jnp.int32),
    }


def _insert_local(local: Buffer, block: dict, *, source: int, interventions_only: bool) -> Buffer:
    rows, row_length = block["valid"].shape
    valid, is_first, terminal, intervention = (
        block[k].astype(bool) for k in ("valid", "is_first", "terminal", "intervention")
    )
    if interventions_only:
        keep = intervention_keep(valid, is_first, terminal, intervention, local.n_step)
    else:
        keep = valid

    def flat(x):
        return x.reshape(rows * row_length, *x.shape[2:])

    keep, is_first, terminal, intervention = map(flat, (keep, is_first, terminal, intervention))
    start, last = segment_bounds(keep, is_first, terminal, row_length)
    sampleable = _sampleable(keep, terminal, last, local.n_step)
    if interventions_only:
        sampleable = sampleable & intervention
    # Later steps of the segment, all written by this insert and newer than t, so stored as long as t is.
    ahead = last - jnp.arange(keep.shape[0])

    # The three running counts in one scan: XLA lowers every cumsum to its own chain of reduce-windows.
    running = jnp.cumsum(jnp.stack([keep, start, sampleable]), axis=1, dtype=jnp.int32)
    capacity = local.segment.shape[0]
    rank = running[0] - 1  # position of each kept step in the compacted stream
    kept = rank[-1] + 1
    # Only the newest C kept steps are written: older ones would land on the same slots in undefined order.
    write = keep & (rank >= kept - capacity)
    # Steps not written get distinct indices past the end (dropped), so every scatter's indices are unique.
    slot = jnp.where(write, (local.pos + rank) % capacity, capacity + jnp.arange(keep.shape[0]))

    def put(field, values):
        return field.at[slot].set(values.astype(field.dtype), mode="drop", unique_indices=True)

    segment = local.next_segment + running[1] - 1
    added = sampleable & write
    # Unwritten kept steps are the oldest, so the sampleable ones among them come before every added one.
    added_rank = running[2] - 1 - jnp.sum(sampleable & ~write, dtype=jnp.int32)
    table = _updated_table(local, slot, added, added_rank)
    return local.replace(
        **table,
        obs={k: put(v, flat(block["obs"][k])) for k, v in local.obs.items()},
        action=put(local.action, flat(block["action"])),
        reward=put(local.reward, flat(block["reward"])),
        terminal=put(local.terminal, terminal),
        segment=put(local.segment, segment),
        # Written after the table read the old flags: the data dependency spares XLA a copy of the array.
        sampleable=local.sampleable.at[jnp.where(table["table_count"] >= 0, slot, slot + capacity)].set(
            sampleable, mode="drop", unique_indices=True
        ),
        ahead=put(local.ahead, jnp.minimum(ahead, AHEAD_CAP)),
        version=put(local.version, flat(block["version"])),
        intervention=put(local.intervention, intervention),
        reward_source=put(local.reward_source, flat(block["reward_source"])),
        source=put(local.source, jnp.full(keep.shape, source)),
        extras={k: put(v, flat(block["extras"][k])) for k, v in local.extras.items()},
        pos=(local.pos + kept) % capacity,
        count=jnp.minimum(local.count + kept, capacity),
        next_segment=local.next_segment + jnp.sum(start, dtype=jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("source", "interventions_only"))
def insert(buffer: Buffer, block: dict, *, source: int, interventions_only: bool = False) -> Buffer:
    """Appends a rollout block. Every field [B, T, ...], B a multiple of D, sharded P("data") or replicated.

    block: obs {key: [B, T, ...]} (keys beyond the buffer's are not stored), action [B, T, A], reward,
    terminal, valid (the step happened), is_first, intervention, version, reward_source, all [B, T], and
    extras {name: [B, T, ...]} for every extra the buffer was created with.
    Each shard takes its B / D rows, row after row. Kept steps: valid ones; with `interventions_only` (the
    patch source) only intervention steps and the `buffer.n_step` steps after each, and only intervention
    steps are sampleable.
    Jitted: called eagerly, the shard_map would compile and dispatch each of its ops alone, on every call.
    """
    if not 0 <= source < len(SOURCES):
        raise ValueError(f"source {source} is not an index into {SOURCES}")
    missing = [k for k in ("obs", *BLOCK_FIELDS) if k not in block]
    missing += [f"obs/{k}" for k in buffer.obs if k not in block.get("obs", {})]
    missing += [f"extras/{k}" for k in buffer.extras if k not in block.get("extras", {})]
    if missing:
        raise ValueError(f"block is missing fields {missing}")
    rows = block["valid"].shape[0]
    if rows % buffer.shards:
        raise ValueError(f"block has {rows} rows; it must be a multiple of the {buffer.shards} devices")
    block = {
        "obs": {k: block["obs"][k] for k in buffer.obs},
        "extras": {k: block["extras"][k] for k in buffer.extras},
        **{k: block[k] for k in BLOCK_FIELDS},
    }
    fn = functools.partial(_insert_local, source=source, interventions_only=interventions_only)
    return jax.shard_map(
        lambda buf, blk: _global(fn(_local(buf), blk)),
        mesh=buffer.mesh,
        in_specs=(P(DATA), P(DATA)),
        out_specs=P(DATA),
    )(buffer, block)


# ---------------------------------------------------------------------------------------------- sample
def _linked(local: Buffer, index: jax.Array, offsets: jax.Array) -> jax.Array:
    """[b, L]: slot index + offsets[j] holds a step of index's run of consecutive steps.

    Within the segment, and within the ring's written history as seen from the slot: forward offsets must
    not pass the newest write, backward ones must not pass the oldest. The ring-age test matters when one
    segment is longer than the shard's capacity, so its id alone cannot tell old steps from new ones.
    """
    capacity = local.segment.shape[0]
    slots = (index[:, None] + offsets) % capacity
    age = ((local.pos - 1 - index) % capacity)[:, None]  # writes since index's; 0 for the newest slot
    in_history = (offsets <= age) & (age - offsets < local.count)
    return in_history & (local.segment[slots] == local.segment[index][:, None])


def gather(local: Buffer, index: jax.Array, *, n_step: int, chunk: int, gamma: float) -> dict:
    """The n-step transitions and action chunks starting at one shard's slots index [b] (int32).

    Step t + j is in the sample while it is in t's segment: j <= ahead[t]. A terminal step ends its segment
    (`segment_bounds`), so nothing after a terminal step is in the sample.

    Returns obs {k: [b, ...]}, chunk [b, H, A], chunk_mask [b, H], reward [b] (discounted sum up to and
    including a terminal step), discount [b] (gamma^n, or 0 after a terminal), next_obs (at t + n; its value
    does not matter where discount is 0), the provenance of t and t's extras.
    """
    capacity = local.segment.shape[0]
    offsets = jnp.arange(_span(n_step, chunk))
    slots = (index[:, None] + offsets) % capacity
    linked = offsets <= local.ahead[index][:, None].astype(jnp.int32)  # [b, L]
    powers = jnp.asarray(gamma, jnp.float32) ** jnp.arange(n_step, dtype=jnp.float32)
    reward = jnp.sum(jnp.where(linked[:, :n_step], local.reward[slots[:, :n_step]], 0.0) * powers, axis=1)
    done = jnp.any(local.terminal[slots[:, :n_step]] & linked[:, :n_step], axis=1)
    chunk_mask = linked[:, :chunk]
    next_slot = (index + n_step) % capacity
    return {
        "obs": {k: v[index] for k, v in local.obs.items()},
        "chunk": jnp.where(chunk_mask[..., None], local.action[slots[:, :chunk]], 0.0),
        "chunk_mask": chunk_mask,
        "reward": reward,
        "discount": jnp.where(done, 0.0, jnp.float32(gamma**n_step)),
        "next_obs": {k: v[next_slot] for k, v in local.obs.items()},
        "version": local.version[index],
        "intervention": local.intervention[index],
        "reward_source": local.reward_source[index],
        "source": local.source[index],
        **{k: v[index] for k, v in local.extras.items()},
    }


def _span(n_step: int, chunk: int) -> int:
    """Steps a sample reads from its start on (the bootstrap observation is read separately)."""
    span = max(n_step, chunk)
    if span - 1 > AHEAD_CAP:
        raise ValueError(f"n_step {n_step} and chunk {chunk} look past the {AHEAD_CAP} steps `ahead` holds")
    return span


def _draw(local: Buffer, key: jax.Array, batch_size: int, *, chunk: int, gamma: float) -> dict:
    """One shard's uniform draw (with replacement) among its sampleable slots (never-written ones are not),
    as `local.n_step`-step transitions: the n the slots were marked sampleable for."""
    total = local.table_count
    draws = jax.random.randint(key, (batch_size,), 0, jnp.maximum(total, 1))
    # An empty shard's table still holds valid slots (zeros), so its draws read real, weight-0 data.
    index = local.table[(local.table_head + draws) % local.table.shape[0]]
    sample = gather(local, index, n_step=local.n_step, chunk=chunk, gamma=gamma)
    sample["weight"] = jnp.where(total > 0, jnp.ones((batch_size,), jnp.float32), 0.0)
    return sample


def _per_shard(batch_size: int, shards: int) -> int:
    if batch_size <= 0 or batch_size % shards:
        raise ValueError(f"batch size {batch_size} must be a positive multiple of the {shards} devices")
    return batch_size // shards


def _shard_key(key: jax.Array) -> jax.Array:
    return jax.random.fold_in(key, jax.lax.axis_index(DATA))


def sample(buffer: Buffer, key: jax.Array, batch_size: int, *, chunk: int, gamma: float) -> dict:
    """batch_size `buffer.n_step`-step samples, batch_size / D from each shard. Every field [batch_size, ...]
    P("data").

    obs, chunk [b, H, A], chunk_mask [b, H], reward, discount, next_obs, weight (0 for every sample of a
    shard with nothing to draw), version, intervention, reward_source, source.
    """
    per_shard = _per_shard(batch_size, buffer.shards)
    draw = functools.partial(_draw, batch_size=per_shard, chunk=chunk, gamma=gamma)
    return on_every_shard(draw, buffer, key)


def on_every_shard(draw, buffer: Buffer, key: jax.Array) -> dict:
    """`draw(local_buffer, shard_key)` on every shard at once; the results concatenate along P("data")."""
    return jax.shard_map(
        lambda buf, key: draw(_local(buf), _shard_key(key)),
        mesh=buffer.mesh,
        in_specs=(P(DATA), P()),
        out_specs=P(DATA),
    )(buffer, key)


def gather_windows(local: Buffer, index: jax.Array, window: int) -> dict:
    """The `window` steps ending at one shard's slots index [b]: fields [b, W, ...], the last one is t.

    mask [b, W] is True where the step is linked to t (same segment, still stored); masked values are 0.
    Extras come windowed too, under their own names.
    """
    capacity = local.segment.shape[0]
    back = jnp.arange(window - 1, -1, -1)  # [W]: how far before t each position is
    slots = (index[:, None] - back) % capacity
    # Linked contiguously from t backwards: a reverse cumulative product over the window.
    mask = jnp.cumprod(_linked(local, index, -back)[:, ::-1], axis=1)[:, ::-1].astype(bool)

    def take(field):
        values = field[slots]
        return jnp.where(
            mask.reshape(mask.shape + (1,) * (values.ndim - 2)), values, jnp.zeros((), values.dtype)
        )

    return {
        "obs": {k: take(v) for k, v in local.obs.items()},
        "action": take(local.action),
        "reward": take(local.reward),
        "terminal": take(local.terminal),
        "intervention": take(local.intervention),
        "mask": mask,
        **{k: take(v) for k, v in local.extras.items()},
    }


def sample_windows(buffer: Buffer, key: jax.Array, batch_size: int, window: int) -> dict:
    """Windows of `window` steps ending at uniformly drawn written slots, for temporal models. P("data").

    obs [b, W, ...], action [b, W, A], reward, terminal, intervention, mask [b, W], weight [b].
    """
    per_shard = _per_shard(batch_size, buffer.shards)

    def draw(local: Buffer, key: jax.Array) -> dict:
        # Written slots are exactly 0 .. count-1: writes start at slot 0 and count saturates at C.
        index = jax.random.randint(key, (per_shard,), 0, jnp.maximum(local.count, 1))
        windows = gather_windows(local, index, window)
        windows["weight"] = jnp.where(local.count > 0, jnp.ones((per_shard,), jnp.float32), 0.0)
        return windows

    return on_every_shard(draw, buffer, key)


def step_in_segment(local: Buffer, index: jax.Array, offset: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The slots `offset` [b] steps from one shard's slots index [b] (negative: earlier), and [b] whether
    each holds a step of index's run of consecutive steps (same segment, still stored)."""
    linked = _linked(local, index, offset[:, None])[:, 0]
    return (index + offset) % local.segment.shape[0], linked


def written(buffer: Buffer) -> jax.Array:
    """[D, C] bool: the slots that hold a step (written slots are 0 .. count-1 of each shard)."""
    return jnp.arange(buffer.segment.shape[-1]) < buffer.count[:, None]


def map_slots(fn, buffer: Buffer, *args) -> dict:
    """`fn(local_buffer, *args)` -> {name: [C, ...]} on every shard at once, args replicated: a value for
    every slot, [D, C, ...] sharded like the buffer (Recap's advantages, from a value over the slots)."""
    return jax.shard_map(
        lambda buf, *a: _global(fn(_local(buf), *a)),
        mesh=buffer.mesh,
        in_specs=(P(DATA), *(P() for _ in args)),
        out_specs=P(DATA),
    )(buffer, *args)


def mix_counts(ratios: dict[str, float], batch_size: int, shards: int) -> dict[str, int]:
    """Samples per source: round(ratio * batch_size) after normalising, the last source the remainder.

    Each count must be a multiple of `shards` so every shard draws the same mixture.
    """
    if not ratios:
        raise ValueError("ratios is empty; name at least one source")
    negative = {k: v for k, v in ratios.items() if v < 0}
    if negative:
        raise ValueError(f"ratios must not be negative: {negative}")
    total = sum(ratios.values())
    if total <= 0:
        raise ValueError(f"ratios {ratios} sum to zero")
    _per_shard(batch_size, shards)
    names = list(ratios)
    counts = {k: round(ratios[k] / total * batch_size) for k in names[:-1]}
    counts[names[-1]] = batch_size - sum(counts.values())
    bad = {k: c for k, c in counts.items() if c < 0 or c % shards}
    if bad:
        raise ValueError(
            f"ratios {ratios} give {counts} of a batch of {batch_size}; {bad} are not multiples of the "
            f"{shards} devices. Choose ratios that split the batch into multiples of {shards}."
        )
    return counts


def sample_mixed(
    buffers: dict[str, Buffer],
    ratios: dict[str, float],
    key: jax.Array,
    batch_size: int,
    *,
    chunk: int,
    gamma: float,
) -> dict:
    """A batch mixing sources by `ratios` (see `mix_counts`); fields as `sample`, P("data"). Each source's
    samples are of its own buffer's n_step.

    Every shard draws its share of every source and concatenates them, so the batch is interleaved by shard
    (the `source` field tells them apart) and the mixing needs no communication. An empty source's samples
    have weight 0.
    """
    unknown = [k for k in ratios if k not in buffers]
    if unknown:
        raise ValueError(f"ratios name {unknown}, which are not among the buffers {sorted(buffers)}")
    meshes = {buffers[k].mesh for k in ratios}
    if len(meshes) > 1:
        raise ValueError("the mixed buffers must live on one mesh")
    mesh = meshes.pop()
    counts = {k: c for k, c in mix_counts(ratios, batch_size, mesh.shape[DATA]).items() if c}
    used = {k: buffers[k] for k in counts}

    def draw(locals_: dict[str, Buffer], key: jax.Array) -> dict:
        keys = jax.random.split(_shard_key(key), len(used))
        parts = [
            _draw(
                _local(locals_[name]),
                key_source,
                counts[name] // mesh.shape[DATA],
                chunk=chunk,
                gamma=gamma,
            )
            for name, key_source in zip(used, keys, strict=True)
        ]
        return jax.tree.map(lambda *x: jnp.concatenate(x), *parts)

    return jax.shard_map(draw, mesh=mesh, in_specs=(P(DATA), P()), out_specs=P(DATA))(used, key)


# ------------------------------------------------------------------------------------ from episodes
def _version(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # "operator", or any name that is not a params version
        return 0


def from_episodes(
    episodes: Sequence[dict],
    rows: int = 16,
    obs_keys: Iterable[str] | None = None,
    extras: Sequence[dict] | None = None,
) -> dict:
    """RLDS episodes (jaxvla.episodes' in-memory format) -> one numpy `insert` block [rows, T, ...].

    Each episode goes to the row that is shortest so far, so rows stay in episode order and T (the longest
    row) stays small. Steps past a row's episodes are valid=False. rows must be a multiple of the devices
    of the mesh the block goes to; a store larger than the buffer should be inserted oldest-first in
    several blocks, since within a block the order across rows is not chronological. `extras`, one
    {name: [T_e, ...]} per episode, are placed as its steps are (block["extras"]).
    """
    if not episodes:
        raise ValueError("no episodes to turn into a block")
    keys = list(obs_keys if obs_keys is not None else episodes[0]["steps"]["observation"])
    lengths = [len(ep["steps"]["is_first"]) for ep in episodes]
    row_lengths = [0] * rows
    places = []
    for length in lengths:
        row = int(np.argmin(row_lengths))
        places.append((row, row_lengths[row]))
        row_lengths[row] += length
    steps = max(row_lengths)

    def empty(value: np.ndarray) -> np.ndarray:
        return np.zeros((rows, steps, *value.shape[1:]), value.dtype)

    first = episodes[0]["steps"]
    block = {
        "obs": {k: empty(np.asarray(first["observation"][k])) for k in keys},
        "action": empty(np.asarray(first["action"], np.float32)),
        "reward": np.zeros((rows, steps), np.float32),
        "terminal": np.zeros((rows, steps), bool),
        "valid": np.zeros((rows, steps), bool),
        "is_first": np.zeros((rows, steps), bool),
        "intervention": np.zeros((rows, steps), bool),
        "version": np.zeros((rows, steps), np.int32),
        "reward_source": np.full((rows, steps), OPERATOR_REWARD, np.int8),
        "extras": {k: empty(np.asarray(v)) for k, v in (extras[0] if extras else {}).items()},
    }
    for episode, length, (row, offset) in zip(episodes, lengths, places, strict=True):
        at = (row, slice(offset, offset + length))
        ep = episode["steps"]
        for k in keys:
            block["obs"][k][at] = ep["observation"][k]
        block["action"][at] = ep["action"]
        block["reward"][at] = ep["reward"]
        block["terminal"][at] = ep["is_last"]  # time limits too: see the module docstring
        block["valid"][at] = True
        block["is_first"][row, offset] = True
        block["intervention"][at] = ep["is_intervention"]
        block["version"][at] = _version(episode["episode_metadata"]["policy_version"])
    for per_step, (row, offset), length in zip(extras or [{}] * len(episodes), places, lengths, strict=True):
        for k, v in per_step.items():
            block["extras"][k][row, offset : offset + length] = v
    return block
