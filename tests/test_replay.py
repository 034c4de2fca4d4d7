"""Replay: insert layout and n-step targets by hand, local sampling without collectives, mixing, restore
from episodes, per-step extras, checkpoints, and a 1M-transition buffer."""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvla.models import ModelConfig
from learner import replay
from learner import sharding
from learner.checkpoints import Checkpoints

# x is a step's id (100 * row + t), and the action [id, -id], so every sample can be traced to its step.
OBS_SPEC = {"x": jax.ShapeDtypeStruct((1,), jnp.float32)}
ONLINE = replay.SOURCES.index("online")
COLLECTIVES = ("all-gather", "all-to-all", "collective-permute", "all-reduce", "reduce-scatter")


@pytest.fixture(autouse=True)
def _key_reuse():
    with jax.debug_key_reuse(True):
        yield


@pytest.fixture(scope="module")
def mesh1():
    return sharding.make_mesh(jax.devices()[:1])


@pytest.fixture(scope="module")
def mesh4():
    assert len(jax.devices()) == 4, "tests/conftest.py sets four fake CPU devices"
    return sharding.make_mesh()


def make_block(valid, is_first, terminal, intervention=None, reward=None) -> dict:
    """A [B, T] block from nested lists; version = row, reward_source = 1 (learned)."""
    valid = np.asarray(valid, bool)
    rows, steps = valid.shape
    ids = (100 * np.arange(rows)[:, None] + np.arange(steps)[None, :]).astype(np.float32)
    return {
        "obs": {"x": ids[..., None]},
        "action": np.stack([ids, -ids], axis=-1),
        "reward": np.zeros((rows, steps), np.float32) if reward is None else np.asarray(reward, np.float32),
        "terminal": np.asarray(terminal, bool),
        "valid": valid,
        "is_first": np.asarray(is_first, bool),
        "intervention": np.zeros((rows, steps), bool)
        if intervention is None
        else np.asarray(intervention, bool),
        "version": np.broadcast_to(np.arange(rows, dtype=np.int32)[:, None], (rows, steps)),
        "reward_source": np.ones((rows, steps), np.int8),
    }


def insert_fn(interventions_only: bool = False, source: int = ONLINE):
    fn = functools.partial(replay.insert, source=source, interventions_only=interventions_only)
    return jax.jit(fn, donate_argnums=0)


def ids(buffer: replay.Buffer) -> np.ndarray:
    """[D, C] step ids stored in each slot, after checking every shard's sample table."""
    for shard in range(buffer.shards):
        assert_table_lists_the_sampleable_slots(replay.shard_view(buffer, shard))
    return np.asarray(buffer.obs["x"][..., 0]).astype(int)


def assert_table_lists_the_sampleable_slots(local: replay.Buffer) -> None:
    """The table's entries in use are exactly the sampleable slots, oldest write first."""
    capacity, count, pos = local.segment.shape[0], int(local.count), int(local.pos)
    oldest = pos if count == capacity else 0
    written = [(oldest + i) % capacity for i in range(count)]
    sampleable = np.asarray(local.sampleable)
    want = [slot for slot in written if sampleable[slot]]
    entries = (int(local.table_head) + np.arange(int(local.table_count))) % capacity
    np.testing.assert_array_equal(np.asarray(local.table)[entries], want)


T, F = True, False
# Four rows of six steps, n_step = 2:
#   row 0: one episode over the whole row, cut by the block's end (no terminal);
#   row 1: an episode that terminates at t=2, then a frozen tail (valid=False);
#   row 2: an episode continued from the previous block ends at t=1, a new one starts at t=2;
#   row 3: an episode continued from the previous block, then frozen from t=4.
BLOCK = make_block(
    valid=[[T] * 6, [T, T, T, F, F, F], [T] * 6, [T, T, T, T, F, F]],
    is_first=[[T, F, F, F, F, F], [T, F, F, F, F, F], [F, F, T, F, F, F], [F] * 6],
    terminal=[[F] * 6, [F, F, T, F, F, F], [F, T, F, F, F, F], [F] * 6],
)
# The kept steps of BLOCK in row-major order: their ids, segments and sampleable flags. A step is sampleable
# when its segment ends with a terminal step or goes on for 2 more steps.
STREAM_IDS = [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202, 203, 204, 205, 300, 301, 302, 303]
STREAM_SEGMENTS = [0] * 6 + [1] * 3 + [2] * 2 + [3] * 4 + [4] * 4
STREAM_SAMPLEABLE = [T, T, T, T, F, F] + [T, T, T] + [T, T] + [T, T, F, F] + [T, T, F, F]
STREAM_AHEAD = [5, 4, 3, 2, 1, 0] + [2, 1, 0] + [1, 0] + [3, 2, 1, 0] + [3, 2, 1, 0]  # later steps of segment


# ------------------------------------------------------------------------------------------ insert
def test_insert_one_device_layout_and_wrap(mesh1):
    insert = insert_fn()
    buffer = insert(replay.create(OBS_SPEC, 2, 24, mesh1, n_step=2), BLOCK)
    np.testing.assert_array_equal(ids(buffer)[0, :19], STREAM_IDS)
    np.testing.assert_array_equal(buffer.segment[0], STREAM_SEGMENTS + [-1] * 5)
    np.testing.assert_array_equal(buffer.sampleable[0], STREAM_SAMPLEABLE + [F] * 5)
    np.testing.assert_array_equal(buffer.ahead[0, :19], STREAM_AHEAD)
    np.testing.assert_array_equal(buffer.version[0, :19], np.asarray(STREAM_IDS) // 100)
    np.testing.assert_array_equal(buffer.source[0, :19], ONLINE)
    assert (int(buffer.pos[0]), int(buffer.count[0]), int(buffer.next_segment[0])) == (19, 19, 5)

    # The same block again: 38 steps in 24 slots. Its ranks 0-4 fill slots 19-23, ranks 5-18 overwrite
    # slots 0-13; slots 14-18 keep the first block's ranks 14-18. Segment ids go on from 5.
    buffer = insert(buffer, BLOCK)
    np.testing.assert_array_equal(ids(buffer)[0], STREAM_IDS[5:] + STREAM_IDS[14:] + STREAM_IDS[:5])
    np.testing.assert_array_equal(
        buffer.segment[0], [5, 6, 6, 6, 7, 7, 8, 8, 8, 8, 9, 9, 9, 9] + [3, 4, 4, 4, 4] + [5] * 5
    )
    np.testing.assert_array_equal(
        buffer.sampleable[0], STREAM_SAMPLEABLE[5:] + STREAM_SAMPLEABLE[14:] + STREAM_SAMPLEABLE[:5]
    )
    assert (int(buffer.pos[0]), int(buffer.count[0]), int(buffer.next_segment[0])) == (14, 24, 10)


def test_insert_more_than_capacity_keeps_the_newest(mesh1):
    # 19 kept steps into 8 slots: ranks 11-18 land on slots 3, 4, 5, 6, 7, 0, 1, 2; pos = 19 % 8 = 3.
    buffer = insert_fn()(replay.create(OBS_SPEC, 2, 8, mesh1, n_step=2), BLOCK)
    np.testing.assert_array_equal(ids(buffer)[0], [301, 302, 303, 202, 203, 204, 205, 300])
    np.testing.assert_array_equal(buffer.segment[0], [4, 4, 4, 3, 3, 3, 3, 4])
    np.testing.assert_array_equal(buffer.sampleable[0], [T, F, F, T, T, F, F, T])
    assert (int(buffer.pos[0]), int(buffer.count[0])) == (3, 8)


def test_insert_four_devices_one_row_per_shard(mesh4):
    insert = insert_fn()
    buffer = insert(replay.create(OBS_SPEC, 2, 32, mesh4, n_step=2), BLOCK)
    assert buffer.segment.sharding.spec == jax.sharding.PartitionSpec(sharding.DATA)
    none = [-1] * 8
    np.testing.assert_array_equal(
        buffer.segment,
        [[0] * 6 + none[:2], [0] * 3 + none[:5], [0, 0, 1, 1, 1, 1] + none[:2], [0] * 4 + none[:4]],
    )
    np.testing.assert_array_equal(
        buffer.sampleable,
        [
            [T, T, T, T, F, F, F, F],
            [T, T, T, F, F, F, F, F],
            [T, T, T, T, F, F, F, F],
            [T, T, F, F, F, F, F, F],
        ],
    )
    np.testing.assert_array_equal(ids(buffer)[1, :3], [100, 101, 102])
    np.testing.assert_array_equal(buffer.pos, [6, 3, 6, 4])
    np.testing.assert_array_equal(buffer.next_segment, [1, 1, 2, 1])

    # Again: shard 0 has 12 steps for 8 slots. Slots 6-7 take the new t=0,1, slots 0-3 the new t=2..5,
    # slots 4-5 still hold the old t=4,5 (never sampleable: their windows ran past the block's end).
    buffer = insert(buffer, BLOCK)
    np.testing.assert_array_equal(ids(buffer)[0], [2, 3, 4, 5, 4, 5, 0, 1])
    np.testing.assert_array_equal(buffer.segment[0], [1, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(buffer.sampleable[0], [T, T, F, F, F, F, T, T])
    np.testing.assert_array_equal(buffer.pos, [4, 6, 4, 0])
    np.testing.assert_array_equal(buffer.count, [8, 6, 8, 8])


def test_sample_table_follows_random_inserts_through_wraps(mesh1):
    # Blocks of 30 steps (more than the ring's 24 slots) with dropped steps, episode ends and sparse
    # interventions: after each insert the table must list exactly the sampleable slots in write order
    # (checked by `ids`).
    rng = np.random.default_rng(1)
    plain, patch = insert_fn(), insert_fn(interventions_only=True)
    buffer = replay.create(OBS_SPEC, 2, 24, mesh1, n_step=2)
    for i in range(12):
        valid, is_first, terminal, intervention = (rng.random((3, 10)) < p for p in (0.8, 0.1, 0.1, 0.3))
        valid[:, :] &= rng.random() < 0.9  # now and then a block with nothing to keep
        block = make_block(valid, is_first, terminal, intervention)
        buffer = (patch if i % 3 == 2 else plain)(buffer, block)
        ids(buffer)


def reference_layout(keep, is_first, terminal, row_length, n_step):
    """stream_layout as a plain loop over the steps."""
    starts, sampleable = [], []
    segment_of = []
    for i, kept in enumerate(keep):
        start = kept and (is_first[i] or i % row_length == 0 or not keep[i - 1] or terminal[i - 1])
        starts.append(start)
        segment_of.append(len([s for s in starts if s]) if kept else -1)
    for i, kept in enumerate(keep):
        last = i
        while last + 1 < len(keep) and segment_of[last + 1] == segment_of[i] and keep[last + 1]:
            last += 1
        sampleable.append(kept and (last - i >= n_step or terminal[last]))
    return starts, sampleable


def test_stream_layout_matches_a_loop():
    rng = np.random.default_rng(0)
    for _ in range(5):
        keep, is_first, terminal = (rng.random((3, 40)) < p for p in (0.8, 0.1, 0.1))
        start, sampleable = replay.stream_layout(
            *(jnp.asarray(x.ravel()) for x in (keep, is_first, terminal)), 40, 3
        )
        expected = reference_layout(*(x.ravel().tolist() for x in (keep, is_first, terminal)), 40, 3)
        np.testing.assert_array_equal(start, expected[0])
        np.testing.assert_array_equal(sampleable, expected[1])


def test_interventions_only_keeps_takeovers_and_their_tails(mesh1):
    # One row, n_step = 2. Episode 1 is t=0..5 (terminal at 5), episode 2 t=6..13 (cut by the block end).
    # Interventions at 2, 3, 5, 8, 12. Kept: 2, 3 and the tail 4, 5; the tail of 5 would cross into episode 2
    # and is not kept; 8 with 9, 10; 12 with 13 (11 is dropped, so 12 starts a new segment).
    # Sampleable: intervention steps whose window is complete: 2, 3, 5 (terminal), 8 (10 is stored); not 12.
    intervention = np.zeros((1, 14), bool)
    intervention[0, [2, 3, 5, 8, 12]] = True
    is_first = np.zeros((1, 14), bool)
    is_first[0, [0, 6]] = True
    terminal = np.zeros((1, 14), bool)
    terminal[0, 5] = True
    block = make_block(np.ones((1, 14), bool), is_first, terminal, intervention)
    patch = replay.SOURCES.index("patch")
    buffer = insert_fn(interventions_only=True, source=patch)(
        replay.create(OBS_SPEC, 2, 16, mesh1, n_step=2), block
    )
    np.testing.assert_array_equal(ids(buffer)[0, :9], [2, 3, 4, 5, 8, 9, 10, 12, 13])
    np.testing.assert_array_equal(buffer.segment[0, :10], [0, 0, 0, 0, 1, 1, 1, 2, 2, -1])
    np.testing.assert_array_equal(buffer.sampleable[0, :10], [T, T, F, T, T, F, F, F, F, F])
    np.testing.assert_array_equal(buffer.intervention[0, :9], [T, T, F, T, T, F, F, T, F])
    np.testing.assert_array_equal(buffer.source[0, :9], patch)
    assert int(buffer.pos[0]) == 9


def test_insert_rejects_bad_blocks(mesh4):
    buffer = replay.create(OBS_SPEC, 2, 32, mesh4, n_step=2)
    with pytest.raises(ValueError, match="multiple of the 4 devices"):
        replay.insert(buffer, jax.tree.map(lambda x: x[:2], BLOCK), source=ONLINE)
    with pytest.raises(ValueError, match="missing fields"):
        replay.insert(buffer, {k: v for k, v in BLOCK.items() if k != "valid"}, source=ONLINE)
    with pytest.raises(ValueError, match="multiple of the 4"):
        replay.create(OBS_SPEC, 2, 30, mesh4, n_step=2)
    with pytest.raises(ValueError, match="n_step must lie in"):
        replay.create(OBS_SPEC, 2, 32, mesh4, n_step=0)


# ---------------------------------------------------------------------------------------- n-step
@pytest.fixture(scope="module")
def two_episodes(mesh1):
    """One shard of 8 slots: episode 1 at t=0..2 (rewards 0, 0, 1; terminal at 2), episode 2 at t=3..7
    (rewards 0.5, 0, 0, 1, 0; cut by the block's end), inserted with n_step = 3. The ring is full: pos = 0."""
    is_first = [[T, F, F, T, F, F, F, F]]
    terminal = [[F, F, T, F, F, F, F, F]]
    block = make_block([[T] * 8], is_first, terminal, reward=[[0, 0, 1, 0.5, 0, 0, 1, 0]])
    return insert_fn()(replay.create(OBS_SPEC, 2, 8, mesh1, n_step=3), block)


def test_n_step_targets_by_hand(two_episodes):
    np.testing.assert_array_equal(two_episodes.sampleable[0], [T, T, T, T, T, F, F, F])
    local = replay.shard_view(two_episodes, 0)
    out = jax.jit(functools.partial(replay.gather, n_step=3, chunk=4, gamma=0.9))(local, jnp.arange(6))
    # t=0: 0 + 0.9 * 0 + 0.81 * 1 = 0.81, terminal at 2 -> discount 0, chunk a0..a2 (a3 is episode 2).
    # t=1: 0 + 0.9 * 1 = 0.9; t=2: 1 (the terminal step itself).
    # t=3: 0.5 + 0 + 0 = 0.5, discount 0.9^3 = 0.729, bootstrap from t=6.
    # t=4: 0 + 0 + 0.81 * 1 = 0.81, bootstrap from t=7.
    # t=5: 0 + 0.9 * 1 + 0 = 0.9; slot 0 after t=7 is older than t=5 (the ring's oldest), so the chunk
    #      stops at t=7. (t=5 is not sampleable: its bootstrap step t=8 was never stored.)
    np.testing.assert_allclose(out["reward"], [0.81, 0.9, 1.0, 0.5, 0.81, 0.9], rtol=1e-6)
    np.testing.assert_allclose(out["discount"], [0, 0, 0, 0.729, 0.729, 0.729], rtol=1e-6)
    np.testing.assert_array_equal(
        out["chunk_mask"],
        [[T, T, T, F], [T, T, F, F], [T, F, F, F], [T, T, T, T], [T, T, T, T], [T, T, T, F]],
    )
    np.testing.assert_array_equal(
        out["chunk"][..., 0],
        [[0, 1, 2, 0], [1, 2, 0, 0], [2, 0, 0, 0], [3, 4, 5, 6], [4, 5, 6, 7], [5, 6, 7, 0]],
    )
    np.testing.assert_array_equal(out["chunk"][..., 1], -out["chunk"][..., 0])
    np.testing.assert_array_equal(out["obs"]["x"][:, 0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(out["next_obs"]["x"][3:5, 0], [6, 7])
    np.testing.assert_array_equal(out["reward_source"], 1)


def test_insert_and_sample_read_the_n_step_the_buffer_was_created_with(two_episodes):
    # Neither call takes an n of its own, so the flags an insert sets and the n a draw uses cannot disagree.
    for fn in (replay.insert, replay.sample, replay.sample_mixed):
        assert "n_step" not in inspect.signature(fn).parameters
    assert two_episodes.n_step == 3  # kept through the jitted, donating insert that filled it
    out = jax.jit(functools.partial(replay.sample, batch_size=64, chunk=4, gamma=0.9))(
        two_episodes, jax.random.key(0)
    )
    # Drawn among the slots sampleable for n = 3 (t=0..4), with 3-step targets: t=0..2 end at episode 1's
    # terminal step (discount 0), t=3 and t=4 bootstrap 3 steps on (0.9^3 = 0.729), as `gather` with n = 3.
    x = np.asarray(out["obs"]["x"][:, 0]).astype(int)
    assert set(x.tolist()) == {0, 1, 2, 3, 4}
    np.testing.assert_allclose(out["discount"], np.where(x >= 3, 0.729, 0.0), rtol=1e-6)
    want = replay.gather(replay.shard_view(two_episodes, 0), jnp.asarray(x), n_step=3, chunk=4, gamma=0.9)
    np.testing.assert_allclose(out["reward"], want["reward"], rtol=1e-6)
    np.testing.assert_array_equal(out["next_obs"]["x"], want["next_obs"]["x"])


def test_windows_stop_at_segment_boundaries(two_episodes):
    local = replay.shard_view(two_episodes, 0)
    out = jax.jit(replay.gather_windows, static_argnums=2)(local, jnp.asarray([4, 2]), 4)
    # Ending at t=4: t=1, 2 are episode 1 -> masked and zeroed. Ending at t=2: slot 7 before slot 0 is the
    # newest step of the ring (episode 2), not the step before t=0.
    np.testing.assert_array_equal(out["mask"], [[F, F, T, T], [F, T, T, T]])
    np.testing.assert_array_equal(out["obs"]["x"][..., 0], [[0, 0, 3, 4], [0, 0, 1, 2]])
    np.testing.assert_array_equal(out["action"][..., 0], [[0, 0, 3, 4], [0, 0, 1, 2]])
    np.testing.assert_array_equal(out["reward"], [[0, 0, 0.5, 0], [0, 0, 0, 1]])
    np.testing.assert_array_equal(out["terminal"], [[F, F, F, F], [F, F, F, T]])


def test_a_segment_longer_than_the_ring(mesh1):
    # One 10-step episode into 8 slots: slots hold t = 8, 9, 2, 3, 4, 5, 6, 7; pos = 2. All share segment 0,
    # so only the ring's age tells t=9 (slot 1) from t=2 (slot 2).
    block = make_block([[T] * 10], [[T] + [F] * 9], [[F] * 10])
    buffer = insert_fn()(replay.create(OBS_SPEC, 2, 8, mesh1, n_step=2), block)
    np.testing.assert_array_equal(ids(buffer)[0], [8, 9, 2, 3, 4, 5, 6, 7])
    np.testing.assert_array_equal(buffer.sampleable[0], [F, F, T, T, T, T, T, T])
    local = replay.shard_view(buffer, 0)
    out = jax.jit(functools.partial(replay.gather, n_step=2, chunk=4, gamma=0.5))(local, jnp.asarray([0, 6]))
    np.testing.assert_array_equal(out["chunk_mask"], [[T, T, F, F], [T, T, T, T]])
    np.testing.assert_array_equal(out["chunk"][..., 0], [[8, 9, 0, 0], [6, 7, 8, 9]])
    np.testing.assert_array_equal(out["next_obs"]["x"][1], [8])
    windows = jax.jit(replay.gather_windows, static_argnums=2)(local, jnp.asarray([1, 3]), 10)
    # Ending at t=9: the 8 stored steps t=2..9. Ending at t=3 (slot 3): only t=2 before it is still stored.
    np.testing.assert_array_equal(windows["mask"], [[F, F] + [T] * 8, [F] * 8 + [T, T]])
    np.testing.assert_array_equal(windows["obs"]["x"][0, :, 0], [0, 0, 2, 3, 4, 5, 6, 7, 8, 9])


# ---------------------------------------------------------------------------------------- sampling
@pytest.fixture(scope="module")
def filled4(mesh4):
    return insert_fn()(replay.create(OBS_SPEC, 2, 32, mesh4, n_step=2), BLOCK)


SAMPLEABLE_IDS = {0, 1, 2, 3, 100, 101, 102, 200, 201, 202, 203, 300, 301}


def test_sample_draws_every_sampleable_slot_and_nothing_else(filled4):
    sample = jax.jit(functools.partial(replay.sample, batch_size=256, chunk=3, gamma=0.9))
    key = jax.random.key(0)
    drawn = set()
    for i in range(4):
        out = sample(filled4, jax.random.fold_in(key, i))
        x = np.asarray(out["obs"]["x"][:, 0]).astype(int)
        # Shard d holds row d only and fills batch entries 64 d .. 64 d + 63 from it.
        np.testing.assert_array_equal(x // 100, np.repeat(np.arange(4), 64))
        np.testing.assert_array_equal(out["version"], x // 100)
        np.testing.assert_array_equal(out["weight"], 1.0)
        drawn |= set(x.tolist())
    assert drawn == SAMPLEABLE_IDS


def test_sample_stays_on_its_shard(filled4):
    sample = jax.jit(functools.partial(replay.sample, batch_size=8, chunk=3, gamma=0.9))
    out = sample(filled4, jax.random.key(1))
    for leaf in jax.tree.leaves(out):
        assert leaf.sharding.spec[0] == sharding.DATA and leaf.shape[0] == 8
    buffers = {"online": filled4, "offline": filled4}
    for fn, args in [
        (sample, (filled4, jax.random.key(1))),
        (functools.partial(replay.sample_windows, batch_size=8, window=3), (filled4, jax.random.key(1))),
        (
            lambda b, k: replay.sample_mixed(b, {"online": 0.5, "offline": 0.5}, k, 16, chunk=3, gamma=0.9),
            (buffers, jax.random.key(1)),
        ),
        (functools.partial(replay.insert, source=ONLINE), (filled4, BLOCK)),
    ]:
        hlo = jax.jit(fn).lower(*args).compile().as_text()
        assert not [c for c in COLLECTIVES if c in hlo]


def test_sample_windows_end_at_written_slots(filled4):
    out = jax.jit(functools.partial(replay.sample_windows, batch_size=256, window=3))(
        filled4, jax.random.key(2)
    )
    x = np.asarray(out["obs"]["x"][..., 0]).astype(int)
    assert set(x[:, -1].tolist()) == set(STREAM_IDS)
    assert np.all(out["mask"][:, -1])
    # Inside a row ids are consecutive, so a masked-in step one before t has id x_t - 1.
    np.testing.assert_array_equal(np.where(out["mask"][:, 1], x[:, 2] - x[:, 1], 1), 1)
    # Row 2's segment starts at t=2 (id 202): its window never reaches back to 201.
    assert not np.any(out["mask"][:, 1] & (x[:, 2] == 202))


def test_sample_mixed_proportions_and_empty_sources(mesh4, filled4):
    offline = insert_fn(source=0)(replay.create(OBS_SPEC, 2, 32, mesh4, n_step=2), BLOCK)
    buffers = {
        "offline": offline,
        "online": filled4,
        "patch": replay.create(OBS_SPEC, 2, 32, mesh4, n_step=2),
    }

    def mixed(ratios, batch_size):
        fn = functools.partial(replay.sample_mixed, chunk=3, gamma=0.9)
        return jax.jit(lambda b, k: fn(b, ratios, k, batch_size))(buffers, jax.random.key(3))

    out = mixed({"offline": 0.5, "online": 0.25, "patch": 0.25}, 64)
    weight, source = np.asarray(out["weight"]), np.asarray(out["source"])
    assert np.sum(weight == 0) == 16  # patch is empty
    assert np.sum((weight == 1) & (source == 0)) == 32
    assert np.sum(source == ONLINE) == 16
    out = mixed({"offline": 1.0, "online": 3.0}, 64)  # normalised: 16 + 48
    assert (np.sum(out["source"] == 0), np.sum(out["source"] == ONLINE)) == (16, 48)
    assert np.all(out["weight"] == 1)

    assert replay.mix_counts({"a": 0.5, "b": 0.5, "c": 0.0}, 64, 4) == {"a": 32, "b": 32, "c": 0}
    with pytest.raises(ValueError, match="not among the buffers"):
        mixed({"offline": 0.5, "demo": 0.5}, 64)
    with pytest.raises(ValueError, match="negative"):
        mixed({"offline": 1.5, "online": -0.5}, 64)
    with pytest.raises(ValueError, match="not multiples of the 4 devices"):
        mixed({"offline": 1 / 3, "online": 2 / 3}, 64)  # 21 + 43
    with pytest.raises(ValueError, match="batch size 30"):
        mixed({"offline": 1.0}, 30)


# ------------------------------------------------------------------------------ episodes, checkpoints
def episode(length: int, first_id: int, version: str, intervention_at=()) -> dict:
    x = np.arange(first_id, first_id + length, dtype=np.float32)[:, None]
    flags = np.zeros(length, bool)
    return {
        "steps": {
            "observation": {"x": x, "unused": np.zeros((length, 2), np.float32)},
            "action": np.concatenate([x, -x], axis=1),
            "reward": np.arange(length, dtype=np.float32),
            "is_first": np.eye(1, length, dtype=bool)[0],
            "is_last": np.eye(1, length, length - 1, dtype=bool)[0],
            "is_terminal": flags,
            "is_intervention": np.isin(np.arange(length), intervention_at),
        },
        "episode_metadata": {"policy_version": version},
    }


def test_from_episodes_packs_rows(mesh1):
    # Lengths 3, 2, 4 into 2 rows: 3 -> row 0; 2 -> row 1; 4 -> row 1 (the shorter, 2 < 3) at t=2..5.
    episodes = [episode(3, 0, "7"), episode(2, 10, "operator"), episode(4, 20, "12", intervention_at=[1])]
    block = replay.from_episodes(episodes, rows=2, obs_keys=["x"])
    assert set(block["obs"]) == {"x"} and block["valid"].shape == (2, 6)
    np.testing.assert_array_equal(block["valid"], [[T, T, T, F, F, F], [T] * 6])
    np.testing.assert_array_equal(block["is_first"], [[T, F, F, F, F, F], [T, F, T, F, F, F]])
    np.testing.assert_array_equal(block["terminal"], [[F, F, T, F, F, F], [F, T, F, F, F, T]])
    np.testing.assert_array_equal(block["version"], [[7, 7, 7, 0, 0, 0], [0, 0, 12, 12, 12, 12]])
    np.testing.assert_array_equal(block["intervention"][1], [F, F, F, T, F, F])
    np.testing.assert_array_equal(block["obs"]["x"][1, :, 0], [10, 11, 20, 21, 22, 23])
    buffer = insert_fn(source=0)(replay.create(OBS_SPEC, 2, 16, mesh1, n_step=2), block)
    np.testing.assert_array_equal(buffer.segment[0, :10], [0, 0, 0, 1, 1, 2, 2, 2, 2, -1])
    np.testing.assert_array_equal(buffer.sampleable[0, :9], T)  # every episode ends in a (terminal) is_last


def test_extras_are_placed_like_their_steps_and_come_with_samples_and_windows(mesh1):
    # Lengths 3, 2, 4 into 2 rows as above; each episode's extra "label" is 2 * its step ids.
    episodes = [episode(3, 0, "7"), episode(2, 10, "operator"), episode(4, 20, "12")]
    extras = [{"label": 2 * ep["steps"]["observation"]["x"][:, 0]} for ep in episodes]
    block = replay.from_episodes(episodes, rows=2, obs_keys=["x"], extras=extras)
    np.testing.assert_array_equal(block["extras"]["label"], 2 * block["obs"]["x"][..., 0] * block["valid"])
    spec = {"label": jax.ShapeDtypeStruct((), jnp.float32)}
    buffer = insert_fn(source=0)(replay.create(OBS_SPEC, 2, 16, mesh1, spec, n_step=1), block)
    local = replay.shard_view(buffer, 0)
    sample = replay.gather(local, jnp.arange(9), n_step=1, chunk=1, gamma=1.0)
    np.testing.assert_array_equal(sample["label"], 2 * sample["obs"]["x"][:, 0])
    # Slot 8 holds x = 23, the last step of the third episode (slots 5-8): a window of 5 masks slot 4.
    windows = replay.gather_windows(local, jnp.array([8]), 5)
    np.testing.assert_array_equal(windows["label"][0], [0, 40, 42, 44, 46])
    # The step two back from x = 23 is x = 21 in the same episode; five back is another episode's.
    slot, linked = replay.step_in_segment(local, jnp.array([8, 8]), jnp.array([-2, -5]))
    np.testing.assert_array_equal(local.obs["x"][slot[0], 0], 21)
    np.testing.assert_array_equal(linked, [True, False])
    with pytest.raises(ValueError, match="extras/label"):
        replay.insert(buffer, {k: v for k, v in block.items() if k != "extras"}, source=0)
    with pytest.raises(ValueError, match="shadow"):
        replay.create(OBS_SPEC, 2, 16, mesh1, {"reward": spec["label"]}, n_step=1)
    filled = replay.map_slots(lambda local: {"twice": 2 * local.obs["x"][:, 0]}, buffer)
    np.testing.assert_array_equal(filled["twice"][replay.written(buffer)], sample["label"])


def test_checkpoint_round_trip(tmp_path, mesh4):
    buffers = replay.create_all(OBS_SPEC, 2, {"offline": 32, "online": 64, "patch": 32}, mesh4, n_step=2)
    buffers["online"] = insert_fn()(buffers["online"], BLOCK)
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, buffers, {"sources": list(buffers)})
    checkpoints.close()
    target = replay.create_all(OBS_SPEC, 2, {"offline": 32, "online": 64, "patch": 32}, mesh4, n_step=2)
    restored, meta = Checkpoints(tmp_path).restore(target)
    assert meta == {"sources": ["offline", "online", "patch"]}
    assert jax.tree.structure(restored) == jax.tree.structure(buffers)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(buffers), strict=True):
        assert got.dtype == want.dtype and got.sharding == want.sharding
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_million_transitions(mesh4):
    spec = {
        k: jax.ShapeDtypeStruct(s.shape[1:], s.dtype) for k, s in ModelConfig().observation_spec(1).items()
    }
    capacity, action_size = 1 << 20, 4
    buffer = replay.create(spec, action_size, capacity, mesh4, n_step=3)
    rng = np.random.default_rng(0)
    rows, steps = 64, 120
    block = {
        "obs": {k: rng.normal(size=(rows, steps, *s.shape)).astype(s.dtype) for k, s in spec.items()},
        "action": rng.normal(size=(rows, steps, action_size)).astype(np.float32),
        "reward": rng.normal(size=(rows, steps)).astype(np.float32),
        "terminal": np.zeros((rows, steps), bool),
        "valid": np.ones((rows, steps), bool),
        "is_first": np.zeros((rows, steps), bool),
        "intervention": np.zeros((rows, steps), bool),
        "version": np.zeros((rows, steps), np.int32),
        "reward_source": np.zeros((rows, steps), np.int8),
    }
    buffer = insert_fn()(buffer, block)
    out = jax.jit(functools.partial(replay.sample, batch_size=256, chunk=4, gamma=0.99))(
        buffer, jax.random.key(0)
    )
    assert float(jnp.min(out["weight"])) == 1.0
    np.testing.assert_array_equal(buffer.count, rows * steps // 4)
    # Per slot: obs bytes + action f32[4] + reward f32 + terminal, sampleable, intervention (bool) +
    # segment, table, version (int32) + ahead, reward_source, source (int8); plus five int32 counters per
    # shard.
    obs_bytes = sum(math.prod(s.shape) * s.dtype.itemsize for s in spec.values())
    per_slot = obs_bytes + 4 * action_size + 4 + 3 * 1 + 3 * 4 + 3 * 1
    assert replay.memory_bytes(buffer) == capacity * per_slot + 5 * 4 * 4
    print(f"\n{capacity} transitions, {per_slot} B each: {replay.memory_bytes(buffer) / 2**20:.1f} MiB")
