"""The Process-Reward Operator: labels, comparisons, window sampling and losses by hand; the band-masked
whole-episode pass against single windows; the numpy forward pass and ranking window against JAX."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import ProConfig
from envs.cell import COLLISION
from envs.cell import DROP
from envs.cell import EVENTS
from envs.cell import SLIP
from envs.cell import TIMEOUT
from envs.cell import WRONG_BIN
from jaxvla import export
from jaxvla.actor import pro as actor_pro
from jaxvla.models import ModelConfig
from jaxvla.models.pro import ProNetConfig
from jaxvla.models.pro import band_mask
from learner import pro

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
            "is_last": np.arange(n) == n - 1,
            "is_intervention": np.zeros(n, bool),
        },
        "episode_metadata": {
            "success": success,
            "retries": retries,
            "cycle_time": n / 10.0,
            "episode_id": f"ep-{seed}",
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
    data = jax.tree.map(jnp.asarray, pro.build_dataset(episodes, PC))
    np.testing.assert_array_equal(data["start"], [0, 3])
    # Step 4 is the second episode's step 1: a window of 4 holds two padding steps, then steps 0 and 1.
    batch = pro.gather_windows(data, jnp.array([4, 8]), 4)
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
    pairs = pro.sample_pairs(data, jax.random.key(0), 64, window=4, faster_margin=0.5)
    anchor, partner = np.split(np.asarray(pairs["index"]), 2)
    episode, start, length = (np.asarray(data[k]) for k in ("episode", "start", "length"))
    fraction = (anchor - start[episode[anchor]] + 0.5) / length[episode[anchor]]
    p = episode[partner]
    np.testing.assert_array_equal(
        partner - start[p], np.minimum(np.floor(fraction * length[p]), length[p] - 1)
    )
    # Episode 0 succeeded, episode 1 failed: the anchor is preferred exactly when it is from episode 0.
    expected = np.sign(np.asarray(p, int) - episode[anchor])
    np.testing.assert_array_equal(pairs["preference"], expected)


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
    # Anchor 0's value puts all its mass on 1.0 at the last step; partner 0's on -1.0.
    value = (
        logits["value"]
        .at[0, -1]
        .set(jnp.array([0, 0, 0, 0, 50.0]))
        .at[2, -1]
        .set(jnp.array([50.0, 0, 0, 0, 0]))
    )
    logits["value"] = value
    batch = {
        "return": jnp.array([1.0, 0.0, -1.0, 0.25]),
        "done": jnp.array([1.0, 0, 0, 0]),
        "success": jnp.ones(4),
        "risk": jnp.array([0, 3, 0, 6]),
        "preference": jnp.array([-1.0, 0.0]),
    }
    out = pro.losses(logits, batch, support, dataclasses.replace(PC, comparison_temperature=0.5))
    uniform = np.log(5.0)
    expected_value = np.mean([0.0, uniform, 0.0, uniform - 0.0])  # two-hot of 0.25 is {0, 0.5}: CE = log 5
    np.testing.assert_allclose(out["value"], expected_value, atol=1e-4)
    np.testing.assert_allclose(out["done"], np.log(2.0), rtol=1e-6)
    np.testing.assert_allclose(out["risk"], np.log(7.0), rtol=1e-6)
    # Only pair 0 is decided, and it prefers the partner: V_anchor - V_partner = 2, logit -2 / 0.5 = -4.
    np.testing.assert_allclose(out["comparison"], np.log1p(np.exp(4.0)), rtol=1e-4)


def test_dense_reward_by_hand():
    value = jnp.array([[0.2, 0.5, 0.9, 0.0]])
    rho = jnp.array([[0.1, 0.0, 0.2, 0.0]])
    valid = jnp.array([[True, True, True, False]])
    r = pro.dense_reward(value, rho, valid, jnp.array([True]), gamma=0.9, risk_weight=0.5, failure_cost=1.0)
    np.testing.assert_allclose(
        r, [[0.9 * 0.5 - 0.2 - 0.05, 0.9 * 0.9 - 0.5, 0.9 * 1.0 - 0.9 - 0.1, 0.0]], atol=1e-6
    )
    failed = pro.dense_reward(
        value, rho, valid, jnp.array([False]), gamma=0.9, risk_weight=0.5, failure_cost=1.0
    )
    np.testing.assert_allclose(failed[0, 2], -0.9 - 0.9 - 0.1, atol=1e-6)


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
    data = jax.tree.map(jnp.asarray, pro.build_dataset(episodes, PC))
    windows = jax.jit(model.outputs)(pro.gather_windows(data, jnp.arange(7), NET.window))
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
    ranked.pro, ranked.risk_weight, ranked.samples = numpy_pro, 0.5, 3
    obs_rows = [{k: v[i] for k, v in steps["observation"].items()} for i in range(6)]
    ranked._obs, ranked._actions, ranked.step = obs_rows[2:5], list(steps["action"][2:5]), 5
    ranked.policy = type(
        "Fixed",
        (),
        {"chunk": NET.chunk, "infer": lambda self, obs, rng: {"actions": np.asarray(candidates[:, 0])}},
    )()
    ranked.rng = None
    out = ranked.infer(obs_rows[5])
    expected = np.asarray(jax_out["value"][:, -1] - 0.5 * jax_out["rho"][:, -1])
    np.testing.assert_allclose(out["scores"], expected, atol=2e-5)
    np.testing.assert_allclose(out["actions"], candidates[int(np.argmax(expected)), 0])


def test_band_mask():
    mask = band_mask(jnp.array([[False, True, True, True]]), 2)
    np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]])
