"""The Process-Reward Operator: labels, comparisons, window sampling and losses by hand; the band-masked
whole-episode pass against single windows; the numpy forward pass and ranking window against JAX."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import compiled_env
from flax import nnx

import envs
from configs import ProConfig
from envs import rollout
from envs.cell import COLLISION
from envs.cell import DROP
from envs.cell import SLIP
from envs.cell import TIMEOUT
from envs.cell import WRONG_BIN
from envs.operator import Trigger
from envs.wrappers import History
from jaxvla import export
from jaxvla.actor import pro as actor_pro
from jaxvla.models import ModelConfig
from jaxvla.models.pro import ProNetConfig
from jaxvla.models.pro import band_mask
from jaxvla.schema import EVENTS
from learner import evaluate
from learner import pro
from learner import replay
from learner import sharding

NET = ProNetConfig(width=16, prompt_dim=4, action_width=8, window=4, heads=2, value_bins=11)
PC = ProConfig(
    net=NET,
    gamma=0.5,
    time_cost=0.01,
    retry_cost=0.1,
    safety_cost=0.2,
    failure_cost=1.0,
    risk_horizon=2,
    batch_size=8,
    steps=20,
    log_every=10,
)

# Jitted here because the tests call them directly: run eagerly, every op of theirs (and of the shard_map
# inside) would be dispatched, and compiled, one at a time.
replay_windows = jax.jit(pro.replay_windows, static_argnums=(2, 3))
sample_pairs = jax.jit(
    pro.sample_pairs, static_argnums=2, static_argnames=("window", "chunk", "faster_margin")
)


def fake_episode(
    n: int, *, success: bool, events: dict[int, str] = (), failure_mode: int = 0, retries=0, seed: int = 0
) -> dict:
    rng = np.random.default_rng(seed)
    flags = np.zeros((n, len(EVENTS)), bool)
    for step, name in dict(events).items():
        flags[step, EVENTS.index(name)] = True
    obs = {
        k: rng.standard_normal((n, *s.shape[1:])).astype(np.float32)
        for k, s in ModelConfig().observation_spec(1).items()
        if k != "prompt"
    }
    obs["prompt"] = np.tile(np.array([[2, 3, 4] + [0] * 9], np.int32), (n, 1))
    return {
        "steps": {
            "observation": obs,
            "action": rng.uniform(-1, 1, (n, 4)).astype(np.float32),
            "events": flags,
            "failure_mode": np.full(n, failure_mode, np.int32),
            "reward": np.zeros(n, np.float32),
            "is_first": np.arange(n) == 0,
            "is_last": np.arange(n) == n - 1,
            "is_intervention": np.zeros(n, bool),
        },
        "episode_metadata": {
            "success": success,
            "retries": retries,
            "cycle_time": n / 10.0,
            "episode_id": f"ep-{seed}",
            "policy_version": "0",
        },
    }


def test_labels_by_hand():
    ep = fake_episode(4, success=False, events={1: "retry", 2: "slip"}, failure_mode=DROP)
    labels = pro.episode_labels(ep, PC)
    # r_hat: -0.01 each step, -0.1 for the retry, -0.2 for the slip, -1 at the failed end.
    np.testing.assert_allclose(
        pro.implicit_reward(ep["steps"]["events"], False, PC), [-0.01, -0.11, -0.21, -1.01], rtol=1e-6
    )
    g3 = -1.01
    g2 = -0.21 + 0.5 * g3
    g1 = -0.11 + 0.5 * g2
    g0 = -0.01 + 0.5 * g1
    np.testing.assert_allclose(labels["return"], [g0, g1, g2, g3], rtol=1e-5)
    # Failures announced: the slip at 2, the episode's failure mode at its end; horizon 2 looks at t, t+1.
    np.testing.assert_array_equal(labels["risk"], [0, SLIP, SLIP, DROP])
    np.testing.assert_array_equal(labels["done"], [0, 0, 0, 1])
    np.testing.assert_array_equal(labels["success"], [0, 0, 0, 0])


def test_step_failures_priority_and_timeout():
    events = np.zeros((3, len(EVENTS)), bool)
    events[0, [EVENTS.index("slip"), EVENTS.index("drop")]] = True  # one step, two: the drop wins
    events[1, EVENTS.index("collision")] = True
    np.testing.assert_array_equal(pro.step_failures(events, np.zeros(3, int), True), [DROP, COLLISION, 0])
    # A failed episode whose last step announces nothing: its failure mode, or a timeout if none is set.
    quiet = np.zeros((2, len(EVENTS)), bool)
    np.testing.assert_array_equal(pro.step_failures(quiet, np.array([0, WRONG_BIN]), False), [0, WRONG_BIN])
    np.testing.assert_array_equal(pro.step_failures(quiet, np.zeros(2, int), False), [0, TIMEOUT])
    np.testing.assert_array_equal(pro.first_within(np.array([0, 0, 0, 5, 0, 2]), 3), [0, 5, 5, 5, 2, 2])


def test_preference_ranks_success_then_stability_retries_and_speed():
    #                   success stable retries cycle
    rows = jnp.array(
        [
            [1, 1, 0, 3.0],  # 0: clean and quick
            [1, 0, 0, 3.0],  # 1: recovered
            [1, 1, 2, 3.0],  # 2: retried twice
            [1, 1, 0, 4.0],  # 3: a second slower
            [0, 1, 0, 2.0],  # 4: failed
            [0, 0, 5, 9.0],  # 5: failed worse, but failures are not ranked among themselves
            [1, 1, 0, 3.2],
        ]
    )  # 6: within the speed margin of 0
    pairs = [
        (0, 4, 1),
        (4, 0, -1),
        (0, 1, 1),
        (1, 0, -1),
        (0, 2, 1),
        (0, 3, 1),
        (3, 0, -1),
        (4, 5, 0),
        (0, 6, 0),
        (1, 2, -1),
    ]
    a = rows[jnp.array([p[0] for p in pairs])]
    b = rows[jnp.array([p[1] for p in pairs])]
    np.testing.assert_array_equal(pro.preference(a, b, 0.5), [p[2] for p in pairs])


def test_windows_pad_before_the_episode_start_and_partners_match_the_fraction():
    episodes = [fake_episode(3, success=True, seed=0), fake_episode(6, success=False, seed=1)]
    buffer = pro.fill_replay(episodes, PC, sharding.make_mesh(jax.devices()[:1]))
    local = replay.shard_view(buffer, 0)  # one row: the episodes at slots 0-2 and 3-8
    # Slot 4 is the second episode's step 1: a window of 4 holds two padding steps, then steps 0 and 1.
    batch = replay_windows(local, jnp.array([4, 8]), 4, NET.chunk)
    np.testing.assert_array_equal(batch["valid"], [[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch["step"], [[0, 0, 0, 1], [2, 3, 4, 5]])
    np.testing.assert_allclose(
        batch["obs"]["telemetry"][1, -1], episodes[1]["steps"]["observation"]["telemetry"][5]
    )
    # The chunk of a step is the actions executed from it on, zero past the episode's end.
    actions = episodes[1]["steps"]["action"]
    np.testing.assert_allclose(batch["chunk"][1, -1, 0], actions[5])
    np.testing.assert_allclose(batch["chunk"][1, -1, 1:], 0.0)
    np.testing.assert_allclose(batch["chunk"][1, -2, :2], actions[4:6])
    pairs = sample_pairs(buffer, jax.random.key(0), 64, window=4, chunk=NET.chunk, faster_margin=0.5)
    # Which episode each window ends in, from its last step's observation.
    owner = {r.tobytes(): e for e, ep in enumerate(episodes) for r in ep["steps"]["observation"]["proprio"]}
    episode = np.array([owner[row.tobytes()] for row in np.asarray(pairs["obs"]["proprio"])[:, -1]])
    step = np.asarray(pairs["step"])[:, -1]
    length = np.array([3, 6])[episode]
    anchor, partner = slice(0, None, 2), slice(1, None, 2)  # pairs are interleaved rows
    fraction = (step[anchor] + 0.5) / length[anchor]
    np.testing.assert_array_equal(
        step[partner], np.minimum(np.floor(fraction * length[partner]), length[partner] - 1)
    )
    assert set(episode[partner]) == {0, 1}
    # Episode 0 succeeded, episode 1 failed: the anchor is preferred exactly when it is from episode 0.
    np.testing.assert_array_equal(pairs["preference"], np.sign(episode[partner] - episode[anchor]))


def test_two_hot_and_losses_by_hand():
    support = jnp.linspace(-1.0, 1.0, 5)  # bins at -1, -0.5, 0, 0.5, 1
    np.testing.assert_allclose(
        pro.two_hot(jnp.array([0.25, -1.0, 3.0]), support),
        [[0, 0, 0.5, 0.5, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1]],
        atol=1e-6,
    )
    b, w = 2, 3
    logits = {
        "value": jnp.zeros((2 * b, w, 5)),
        "done": jnp.zeros((2 * b, w)),
        "success": jnp.zeros((2 * b, w)),
        "risk": jnp.zeros((2 * b, w, 7)),
    }
    # Rows 0 and 1 are pair 0: anchor 0's value puts all its mass on 1.0 at the last step, partner 0's on -1.
    value = (
        logits["value"]
        .at[0, -1]
        .set(jnp.array([0, 0, 0, 0, 50.0]))
        .at[1, -1]
        .set(jnp.array([50.0, 0, 0, 0, 0]))
    )
    logits["value"] = value
    batch = {
        "return": jnp.array([1.0, -1.0, 0.0, 0.25]),
        "done": jnp.array([1.0, 0, 0, 0]),
        "success": jnp.ones(4),
        "risk": jnp.array([0, 3, 0, 6]),
        "preference": jnp.array([-1.0, 0.0]),
    }
    out = pro.losses(logits, batch, support, dataclasses.replace(PC, comparison_temperature=0.5))
    uniform = np.log(5.0)
    expected_value = np.mean([0.0, 0.0, uniform, uniform])  # two-hot of 0.25 is {0, 0.5}: CE = log 5
    np.testing.assert_allclose(out["value"], expected_value, atol=1e-4)
    np.testing.assert_allclose(out["done"], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(out["risk"], np.log(7.0), rtol=1e-6)
    # Only pair 0 is decided, and it prefers the partner: V_anchor - V_partner = 2, logit -2 / 0.5 = -4.
    np.testing.assert_allclose(out["comparison"], np.log1p(np.exp(4.0)), rtol=1e-4)


def test_shaped_return_is_the_sparse_return_minus_the_first_potential_by_hand():
    # gamma 0.5, beta 1. Row 0: a success in 3 steps, Φ = 0.2, 0.6, 0.4, then 0 after the terminal step.
    #   r'_0 = 0 + 0.5*0.6 - 0.2 = 0.1;  r'_1 = 0 + 0.5*0.4 - 0.6 = -0.4;  r'_2 = 1 + 0.5*0 - 0.4 = 0.6
    #   shaped return 0.1 + 0.5*(-0.4) + 0.25*0.6 = 0.05 = sparse 0.25*1 - Φ(s_0) 0.2.
    # Row 1: a failure in 2 steps (padding after), beta 1: r'_0 = 0.5*0.5 - 0.3 = -0.05; r'_1 = -0.5.
    sparse = jnp.array([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    phi = jnp.array([[0.2, 0.6, 0.4], [0.3, 0.5, 0.9]])
    valid = jnp.array([[True, True, True], [True, True, False]])
    terminal = jnp.array([[False, False, True], [False, True, False]])
    r = pro.shaped_reward(sparse, phi, valid, terminal, gamma=0.5, beta=1.0)
    np.testing.assert_allclose(r, [[0.1, -0.4, 0.6], [-0.05, -0.5, 0.0]], atol=1e-6)
    assert float(r[0, 0] + 0.5 * r[0, 1] + 0.25 * r[0, 2]) == pytest.approx(0.25 - 0.2, abs=1e-6)
    assert float(r[1, 0] + 0.5 * r[1, 1]) == pytest.approx(0.0 - 0.3, abs=1e-6)
    # beta scales the shaping only: the same success with beta 2 returns 0.25 - 2*0.2.
    r2 = pro.shaped_reward(sparse, phi, valid, terminal, gamma=0.5, beta=2.0)
    assert float(pro.discounted_returns(np.asarray(r2[0]), 0.5)[0]) == pytest.approx(0.25 - 0.4, abs=1e-6)


def test_shaping_keeps_every_episodes_return_up_to_the_first_potential():
    rng = np.random.default_rng(0)
    gamma, beta, n = 0.97, 0.7, 40
    sparse = np.zeros((1, n), np.float32)
    sparse[0, -1] = 1.0
    phi = rng.uniform(-1, 1, (1, n)).astype(np.float32)
    terminal = np.arange(n)[None] == n - 1
    r = pro.shaped_reward(sparse, phi, np.ones((1, n), bool), terminal, gamma=gamma, beta=beta)
    shaped = pro.discounted_returns(np.asarray(r[0], np.float64), gamma)[0]
    assert shaped == pytest.approx(gamma ** (n - 1) - beta * phi[0, 0], abs=1e-5)


def test_potential_carries_risk_only_with_its_weight():
    readouts = {"value": jnp.array([[0.5, 0.2]]), "rho": jnp.array([[0.4, 0.1]])}
    np.testing.assert_allclose(pro.potential(readouts, 0.0), [[0.5, 0.2]])
    np.testing.assert_allclose(pro.potential(readouts, 0.5), [[0.3, 0.15]], atol=1e-7)


def test_the_deterministic_chunk_keeps_its_place_unless_beaten_by_the_margin():
    value, rho = jnp.array([[0.50], [0.58], [0.40]]), jnp.array([[0.0], [0.1], [0.0]])
    # Scores V - 0.5 rho: 0.50, 0.53, 0.40. Without a margin candidate 1 wins; a margin of 0.05 keeps 0.
    plain = pro.ranking_scores(value, rho, risk_weight=0.5, margin=0.0)
    assert int(jnp.argmax(plain[:, 0])) == 1
    kept = pro.ranking_scores(value, rho, risk_weight=0.5, margin=0.05)
    np.testing.assert_allclose(kept[:, 0], [0.55, 0.53, 0.40], atol=1e-6)


POLICY_ALONE = np.array([True] * 20 + [False] * 12)  # validation successes of the policy alone


def ranked(wins: int, losses: int) -> np.ndarray:
    """Ranked successes on the same contexts: it wins `wins` the policy lost and loses `losses` it won."""
    out = POLICY_ALONE.copy()
    out[20 : 20 + wins] = True
    out[:losses] = False
    return out


def test_the_sign_test_by_hand():
    # 5 wins, 0 losses: P(X >= 5 | n = 5, 1/2) = 1/32; 3 wins, 1 loss: P(X >= 3 | 4) = 5/16.
    assert pro.sign_test(ranked(5, 0), POLICY_ALONE) == pytest.approx(1 / 32)
    assert pro.sign_test(ranked(3, 1), POLICY_ALONE) == pytest.approx(5 / 16)
    assert pro.sign_test(POLICY_ALONE, POLICY_ALONE) == 1.0


def choose(outcomes: dict[float, np.ndarray], level: float) -> float:
    return pro.choose_margin(outcomes, pro.sign_tests(outcomes), level)


def test_a_margin_replaces_the_policy_only_with_a_significant_validation_gain():
    inf, alone = float("inf"), POLICY_ALONE
    # 8 wins, none lost: p = 1/256, under 0.05 / 2. 3 wins, 1 lost (the one-context gain of 7e48f1a): no.
    assert choose({0.0: ranked(3, 1), 0.05: ranked(8, 0), inf: alone}, 0.05) == 0.05
    assert choose({0.0: ranked(3, 1), inf: alone}, 0.05) == inf
    # Both significant and equally good: the larger margin keeps the policy's own chunk more often.
    assert choose({0.0: ranked(8, 0), 0.1: ranked(8, 0), inf: alone}, 0.05) == 0.1
    # Bonferroni: 6 wins (p = 1/64) pass for one margin tried at 0.05, not for five.
    assert choose({0.1: ranked(6, 0), inf: alone}, 0.05) == 0.1
    five = {m: ranked(6, 0) for m in (0.0, 0.02, 0.05, 0.1, 0.2)}
    assert choose({**five, inf: alone}, 0.05) == inf


def test_calql_penalty_by_hand():
    # Example 0: values off the data 0.9 and 0.1, return 0.5 -> max: 0.9, 0.5 -> mean 0.7; minus Q_data 0.6.
    # Example 1: 0.0 and 0.2, return -0.5 -> mean 0.1; minus Q_data 0.3 -> -0.2.  Mean: (0.1 - 0.2) / 2.
    q_other = jnp.array([[0.9, 0.0], [0.1, 0.2]])
    penalty = pro.calql_penalty(jnp.array([0.6, 0.3]), q_other, jnp.array([0.5, -0.5]))
    assert float(penalty) == pytest.approx(-0.05, abs=1e-6)


def test_substituted_chunk_matches_the_ranking_window():
    # Window 4, chunk 3, actions numbered: a step's chunk holds the actions from it on; from the window's
    # last step on, the candidate's actions replace the logged ones, as window_from_history builds them.
    w, h = 4, 3
    logged = np.arange(10, dtype=np.float32)[:, None]  # [T, 1]: action t is t
    chunks = (np.arange(2, 6)[:, None] + np.arange(h)).astype(np.float32)[None, :, :, None]  # steps 2..5
    candidate = -np.arange(1, h + 1, dtype=np.float32)[None, :, None]  # actions -1, -2, -3 from step 5
    out = np.asarray(pro.substitute_chunk(jnp.asarray(chunks), jnp.asarray(candidate)))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[2, 3, 4], [3, 4, -1], [4, -1, -2], [-1, -2, -3]])
    history = {
        "obs": {"x": jnp.zeros((1, w, 1))},
        "action": jnp.asarray(logged[1:5])[None],
        "valid": jnp.ones((1, w), bool),
    }
    window = pro.window_from_history(history, {"x": jnp.zeros((1, 1))}, jnp.array([5]), candidate[None])
    np.testing.assert_array_equal(np.asarray(window["chunk"])[0, :, :, 0], out)


def test_candidates_start_with_the_deterministic_chunk():
    mean = jnp.array([[[0.3, -2.0]], [[1.0, 0.0]]])  # [B=2, H=1, A=2]
    candidates = pro.candidate_chunks(jax.random.key(0), mean, jnp.zeros_like(mean), 5)
    assert candidates.shape == (5, 2, 1, 2)
    np.testing.assert_allclose(candidates[0], jnp.tanh(mean), atol=1e-7)
    assert float(jnp.min(jnp.abs(candidates[1:] - jnp.tanh(mean)))) > 0  # the others are sampled


def test_metrics_by_hand():
    assert pro.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert pro.calibration_error(np.array([0.05, 0.05, 0.95, 0.95]), np.array([0, 1, 1, 1])) == pytest.approx(
        0.5 * 0.45 + 0.5 * 0.05
    )
    assert pro.lead_time(np.array([0.9, 0.1, 0.6, 0.7, 0.8]), 4, 0.5) == 3
    assert pro.lead_time(np.array([0.9, 0.1, 0.6, 0.7, 0.2]), 4, 0.5) == 0
    assert pro.spearman(np.array([1.0, 2, 3, 5]), np.arange(4)) == pytest.approx(1.0)
    readouts = {"success": np.array([0.9, 0.1, 0.05, 0.5])}
    events = np.zeros((4, len(EVENTS)), bool)
    events[[0, 2, 3], EVENTS.index("retry")] = True
    assert pro.gate(readouts, events, 0.2) == 2


def reference_windows(episodes: list[dict], t: np.ndarray, window: int, chunk: int) -> dict:
    """The windows of the padded-dataset path that the replay replaced, kept as the reference: every step
    flat, t [B] a flat index, steps before the episode's start repeat its first step and are not valid."""
    lengths = np.array([len(ep["steps"]["action"]) for ep in episodes])
    start = np.repeat(np.cumsum(lengths) - lengths, lengths)[t]
    index = t[:, None] - (window - 1) + np.arange(window)
    valid = index >= start[:, None]
    index = np.maximum(index, start[:, None])

    def executed_chunks(actions):  # [T, A] -> [T, H, A]: the actions from each step on, zeros past the end
        padded = np.concatenate([actions, np.zeros((chunk - 1, actions.shape[1]), actions.dtype)])
        return np.stack([padded[i : i + len(actions)] for i in range(chunk)], axis=1)

    flat = lambda per_episode: np.concatenate([per_episode(ep) for ep in episodes])  # noqa: E731
    keys = episodes[0]["steps"]["observation"]
    obs = {k: flat(lambda ep, k=k: ep["steps"]["observation"][k])[index] for k in keys}
    labels = [pro.episode_labels(ep, PC) for ep in episodes]
    return {
        "obs": obs,
        "chunk": flat(lambda ep: executed_chunks(ep["steps"]["action"]))[index],
        "step": np.concatenate([np.arange(n) for n in lengths])[index],
        "valid": valid,
        **{k: np.concatenate([lab[k] for lab in labels])[t] for k in ("return", "done", "success", "risk")},
    }


def written_windows(buffer: replay.Buffer, window: int, chunk: int) -> dict:
    """`pro.replay_windows` ending at every written slot of every shard: fields [N, ...] (numpy)."""
    every = jax.jit(
        lambda b: replay.map_slots(
            lambda local: pro.replay_windows(local, jnp.arange(local.segment.shape[0]), window, chunk), b
        )
    )(buffer)
    written = np.asarray(replay.written(buffer))
    return jax.tree.map(lambda x: np.asarray(x)[written], every)


@pytest.mark.parametrize("devices", [1, 4])
def test_replay_windows_equal_the_padded_dataset_windows(devices, model):
    lengths = [3, 6, 9, 5, 7, 4, 8, 2]
    episodes = [
        fake_episode(n, success=i % 3 > 0, events={n - 1: "slip"} if i % 2 else (), retries=i % 2, seed=i)
        for i, n in enumerate(lengths)
    ]
    buffer = pro.fill_replay(episodes, PC, sharding.make_mesh(jax.devices()[:devices]))
    got = written_windows(buffer, NET.window, NET.chunk)
    # Every step once: find each window's step t among the flat steps by its (unique, random) observation.
    flat = np.concatenate([ep["steps"]["observation"]["proprio"] for ep in episodes])
    where = {row.tobytes(): i for i, row in enumerate(flat)}
    t = np.array([where[row.tobytes()] for row in got["obs"]["proprio"][:, -1]])
    assert sorted(t) == list(range(sum(lengths)))
    want = reference_windows(episodes, t, NET.window, NET.chunk)
    np.testing.assert_array_equal(got["valid"], want["valid"])
    valid = want["valid"]
    for k in want["obs"]:
        np.testing.assert_array_equal(got["obs"][k][valid], want["obs"][k][valid])
    np.testing.assert_array_equal(got["chunk"][valid], want["chunk"][valid])
    np.testing.assert_array_equal(got["step"][valid], want["step"][valid])
    for k in ("return", "done", "success", "risk"):
        np.testing.assert_array_equal(got[k], want[k])
    # Padding differs (zeros here, the first step there) but is masked: the model reads the same windows.
    outputs = jax.jit(model.outputs)
    mine, theirs = outputs(got), outputs(want)
    for k in ("value", "rho", "done", "success"):
        np.testing.assert_allclose(mine[k][:, -1], theirs[k][:, -1], atol=1e-5)


def test_a_pro_update_on_four_devices_equals_the_single_device_update(model):
    episodes = [fake_episode(n, success=i % 2 == 0, retries=i, seed=i) for i, n in enumerate([5, 7, 6, 9])]
    buffer = pro.fill_replay(episodes, PC, sharding.make_mesh(jax.devices()[:1]))
    batch = jax.device_get(
        sample_pairs(buffer, jax.random.key(0), 16, window=NET.window, chunk=NET.chunk, faster_margin=0.5)
    )
    assert np.any(batch["preference"] != 0)  # the comparison loss takes part
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        mesh = sharding.make_mesh(devices)
        # Plain SGD: a first Adam step divides by |g| and amplifies float noise in gradients near zero.
        optimizer = optax.sgd(0.1)
        state = pro.bc.init_state(jax.tree.map(jnp.copy, model.params), optimizer)
        new, metrics = pro.make_update(model.graphdef, model.stats, optimizer, PC, mesh)(state, batch)
        results.append(jax.device_get((new.params, metrics)))
    for one, four in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(np.asarray(one), np.asarray(four), rtol=2e-5, atol=1e-6)


@pytest.fixture(scope="module")
def model():
    graphdef, params = nnx.split(NET.create(0), nnx.Param)
    rng = np.random.default_rng(0)
    stats = {
        k: {
            "mean": rng.standard_normal(s.shape[1:]).astype(np.float32),
            "std": rng.uniform(0.5, 2, s.shape[1:]).astype(np.float32),
        }
        for k, s in ModelConfig().observation_spec(1).items()
        if k != "prompt"
    }
    return pro.Pro(NET, graphdef, params, stats)


def test_one_pass_over_an_episode_equals_each_window_alone(model):
    episodes = [fake_episode(7, success=True, seed=3)]
    whole = pro.score_episodes(model, episodes, length=8, batch=1)[0]
    local = replay.shard_view(pro.fill_replay(episodes, PC, sharding.make_mesh(jax.devices()[:1])), 0)
    windows = jax.jit(model.outputs)(replay_windows(local, jnp.arange(7), NET.window, NET.chunk))
    np.testing.assert_allclose(whole["value"], windows["value"][:, -1], atol=1e-5)
    np.testing.assert_allclose(whole["rho"], windows["rho"][:, -1], atol=1e-5)


def test_numpy_pro_and_ranking_window_match_jax(model, tmp_path):
    path = export.write_pro(tmp_path / "pro.msgpack", NET, model.params, model.stats, version=1)
    numpy_pro = actor_pro.load(path)
    episode = fake_episode(6, success=True, seed=4)
    steps = episode["steps"]
    # History after 5 steps (window 4 keeps the last 4), the observation at step 5, 3 candidate chunks.
    w = NET.window
    history = {
        "obs": {k: jnp.asarray(v[1:5])[None] for k, v in steps["observation"].items()},
        "action": jnp.asarray(steps["action"][1:5])[None],
        "valid": jnp.ones((1, w), bool),
    }
    now = {k: jnp.asarray(v[5])[None] for k, v in steps["observation"].items()}
    candidates = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, (3, 1, NET.chunk, 4)), jnp.float32)
    jax_out = jax.jit(model.outputs)(pro.window_from_history(history, now, jnp.array([5]), candidates))
    # The numpy side builds the same window from its own history.
    ranked = actor_pro.RankedPolicy.__new__(actor_pro.RankedPolicy)
    ranked.pro, ranked.risk_weight, ranked.samples, ranked.margin = numpy_pro, 0.5, 3, 0.01
    obs_rows = [{k: v[i] for k, v in steps["observation"].items()} for i in range(6)]
    ranked._obs, ranked._actions, ranked.step = obs_rows[2:5], list(steps["action"][2:5]), 5
    ranked.policy = type(
        "Fixed",
        (),
        # Candidate 0 is the deterministic chunk tanh(mean): give it a mean whose tanh is candidate 0.
        {
            "chunk": NET.chunk,
            "infer": lambda self, obs, rng: {
                "actions": np.asarray(candidates[:, 0]),
                "mean": np.arctanh(np.asarray(candidates[:, 0], np.float64)).astype(np.float32),
            },
        },
    )()
    ranked.rng = None
    out = ranked.infer(obs_rows[5])
    expected = np.asarray(
        pro.ranking_scores(jax_out["value"][:, -1], jax_out["rho"][:, -1], risk_weight=0.5, margin=0.01)
    )
    np.testing.assert_allclose(out["candidates"], candidates[:, 0], atol=1e-6)
    np.testing.assert_allclose(out["scores"], expected, atol=1e-4)
    np.testing.assert_allclose(out["actions"], candidates[int(np.argmax(expected)), 0], atol=1e-6)


def test_an_infinite_margin_leaves_the_policy_acting_alone(model):
    policy_config = ModelConfig(width=16, prompt_dim=4, depth=1)
    graphdef, params = nnx.split(policy_config.create_policy(0), nnx.Param)
    env = History(envs.make("pick_place"), NET.window)
    state = jax.jit(jax.vmap(env.reset))(jax.random.split(jax.random.key(0), 3))
    ranked = pro.ranking_actor(graphdef, model.stats, model, samples=4, risk_weight=0.5)
    alone = evaluate.chunk_actor(graphdef, model.stats)
    key = jax.random.key(1)
    chosen = jax.jit(ranked)(pro.ranking_params(params, float("inf")), state, key)
    np.testing.assert_array_equal(chosen, jax.jit(alone)(params, state.obs, key))
    # With no margin, a sampled chunk can win: the same actor, another params value, one program.
    assert jax.jit(ranked)(pro.ranking_params(params, 0.0), state, key).shape == chosen.shape


def test_band_mask():
    mask = band_mask(jnp.array([[False, True, True, True]]), 2)
    np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])


STATE_NET = dataclasses.replace(NET, action_input=False)


@pytest.fixture(scope="module")
def state_model(model):
    graphdef, params = nnx.split(STATE_NET.create(1), nnx.Param)
    return pro.Pro(STATE_NET, graphdef, params, model.stats)


def test_a_state_only_pro_ignores_the_chunk_and_matches_numpy(state_model, tmp_path):
    episode = fake_episode(6, success=True, seed=5)
    obs, actions, valid = pro.pad_episodes([episode], 6)
    batch = pro.sequence_batch(obs, jnp.asarray(actions), jnp.asarray(valid), STATE_NET.chunk)
    outputs = jax.jit(state_model.outputs)
    one = outputs(batch)
    other = outputs({**batch, "chunk": -batch["chunk"]})
    np.testing.assert_array_equal(one["value"], other["value"])
    np.testing.assert_array_equal(one["rho"], other["rho"])
    path = export.write_pro(
        tmp_path / "state.msgpack", STATE_NET, state_model.params, state_model.stats, version=1
    )
    numpy_out = actor_pro.load(path)(obs, batch["chunk"], batch["step"], valid)
    np.testing.assert_allclose(numpy_out["value"], one["value"], atol=1e-4)
    np.testing.assert_allclose(numpy_out["rho"], one["rho"], atol=1e-4)


def relabel_block() -> tuple[list[dict], dict]:
    """Two episodes (a success of 5 steps, a failure of 3) and their padded insert block."""
    episodes = [fake_episode(5, success=True, seed=6), fake_episode(3, success=False, seed=7)]
    obs, actions, valid = pro.pad_episodes(episodes, 5)
    sparse = np.zeros((2, 5), np.float32)
    sparse[0, 4] = 1.0
    terminal = np.zeros((2, 5), bool)
    terminal[0, 4] = terminal[1, 2] = True
    block = {
        "obs": obs,
        "action": jnp.asarray(actions),
        "valid": jnp.asarray(valid),
        "reward": sparse,
        "terminal": terminal,
        "reward_source": jnp.zeros((2, 5), jnp.int8),
    }
    return episodes, block


def test_relabel_shapes_the_sparse_reward_with_a_state_only_pro(state_model, model):
    episodes, block = relabel_block()
    sparse = block["reward"]
    out = pro.relabel(state_model, block, jnp.array([True, False]), gamma=0.9, beta=1.0, risk_weight=0.0)
    phi = pro.score_episodes(state_model, episodes, length=5, batch=2)
    for b, n in ((0, 5), (1, 3)):
        shaped = pro.discounted_returns(np.asarray(out["reward"][b, :n], np.float64), 0.9)[0]
        assert shaped == pytest.approx(0.9**4 * sparse[b, 4] - phi[b]["value"][0], abs=1e-5)
    assert int(out["reward_source"][0, 0]) == pro.LEARNED_REWARD
    with pytest.raises(ValueError, match="state-only"):
        pro.relabel(model, block, jnp.array([True, False]), gamma=0.9, beta=1.0, risk_weight=0.0)


def test_shaping_on_a_mesh_puts_the_shaped_block_beside_the_sharded_replay(state_model):
    # A restored PRO's params sit on one device. Shaped there, the block could not join a replay sharded
    # over the mesh's four devices (the insert refused it).
    mesh = sharding.make_mesh()
    restored = dataclasses.replace(state_model, params=jax.device_put(state_model.params, jax.devices()[0]))
    shaping = pro.Shaping(restored, gamma=0.9, beta=1.0, risk_weight=0.0, mesh=mesh)
    block = jax.device_put(relabel_block()[1], jax.devices()[0])  # as a rollout's is
    shaped = shaping(block)
    assert all(x.sharding.device_set == set(mesh.devices.flat) for x in jax.tree.leaves(shaped))
    shaping.model = restored  # each patching run starts again from the restored PRO
    shaped = shaping(block)
    assert all(x.sharding.device_set == set(mesh.devices.flat) for x in jax.tree.leaves(shaped))


def test_conservative_training_runs_and_refresh_moves_only_the_params(state_model, model):
    episodes = [fake_episode(9, success=s, seed=i) for i, s in enumerate([True, False, True, False])]
    pc = dataclasses.replace(PC, conservative=5.0, conservative_samples=2)
    buffer = pro.fill_replay(episodes, pc, sharding.make_mesh())
    optimizer = pro.bc.make_optimizer(1e-3, pc.steps, 0, 0.0)
    state = pro.bc.init_state(jax.tree.map(jnp.copy, model.params), optimizer)
    train = pro.make_train_steps(model.graphdef, model.stats, optimizer, pc)
    _, metrics = train(state, buffer, jax.random.key(0))
    assert np.isfinite(float(metrics["conservative"]))
    with pytest.raises(ValueError, match="action-conditioned"):
        state_pc = dataclasses.replace(pc, net=STATE_NET)
        pro.make_train_steps(state_model.graphdef, model.stats, optimizer, state_pc)
    # In a replay sized for any round (the patching loop's), so every round trains with one program. The
    # config's Cal-QL α is for ranking: refreshing the state-only PRO leaves the term out.
    refreshed, metrics = pro.Refresher(state_model, pc, steps=4)(
        state_model, episodes, jax.random.key(1), capacity=72
    )
    assert np.isfinite(float(metrics["loss"]))
    assert refreshed.stats is state_model.stats
    before, after = jax.tree.leaves(state_model.params), jax.tree.leaves(refreshed.params)
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


def test_a_refresh_replay_too_small_for_the_episodes_is_refused(state_model):
    # Four episodes, one per shard of the four fake devices: 36 steps, more than the 8 slots asked for.
    episodes = [fake_episode(9, success=True, seed=i) for i in range(4)]
    with pytest.raises(ValueError, match="do not fit"):
        pro.fill_replay(episodes, PC, sharding.make_mesh(), capacity=8)


def test_risk_takeover_calls_the_operator_when_rho_passes_the_threshold(state_model):
    base = compiled_env("pick_place").env
    silent = Trigger(slip=1e9, force=1e9, on_failure_event=False, stall_steps=10**6)

    # The threshold is an argument, so both thresholds run one compiled program.
    @jax.jit
    def run(key, threshold):
        env = pro.risk_takeover(state_model, threshold)(base, silent)  # what patch.Collector builds

        def body(state, _):
            new = rollout.freeze_when_done(state, env.step(state, jnp.zeros(4)))
            return new, (new.info["is_intervention"], new.info["rho"])

        return jax.lax.scan(body, env.reset(key), None, 3)[1]

    def taken_over(threshold: float) -> np.ndarray:
        intervention, rho = run(jax.random.key(0), jnp.float32(threshold))
        assert np.all((np.asarray(rho) >= 0) & (np.asarray(rho) <= 1))
        return np.asarray(intervention)

    assert taken_over(-1.0).all()  # every rho exceeds -1: the operator acts from the first step
    assert not taken_over(2.0).any()  # no rho exceeds 2, and every scripted sign is off
