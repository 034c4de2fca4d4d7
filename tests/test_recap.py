"""Recap: rewards, value targets, N-step advantages, thresholds, indicators, the 50:50 sampler, AUROC and
guidance, by hand."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import fewest_successes
from flax import nnx

import configs
from envs.wrappers import Trigger
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import bc
from learner import compile_cache
from learner import dataset
from learner import evaluate
from learner import patch
from learner import recap
from learner import replay
from learner import sharding
from learner.pretrain import Prior

POS, NEG, NONE = models.INDICATOR_POSITIVE, models.INDICATOR_NEGATIVE, models.INDICATOR_NONE

# Two episodes padded to T = 4: a success of 3 steps and a failure of 2. Max episode length 10.
VALID = jnp.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
SUCCESS = jnp.array([True, False])


def test_reward_is_minus_one_per_step_then_zero_or_minus_c_fail_normalised():
    rewards = recap.step_rewards(VALID, SUCCESS, max_steps=10, c_fail=1.0)
    # -1/10 per step; the success's last step 0, the failure's last step -C_fail = -1.
    np.testing.assert_allclose(rewards, [[-0.1, -0.1, 0.0, 0.0], [-0.1, -1.0, 0.0, 0.0]], rtol=1e-6)


def test_value_targets_are_steps_to_success_and_failures_sit_at_the_bottom():
    rewards = recap.step_rewards(VALID, SUCCESS, max_steps=10, c_fail=1.0)
    np.testing.assert_allclose(
        recap.returns_to_go(rewards), [[-0.2, -0.1, 0, 0], [-1.1, -1.0, 0, 0]], rtol=1e-6
    )
    # Clipped to the support [-1, 0]: 2 and 1 steps to success; the failure is -1 throughout.
    np.testing.assert_allclose(
        recap.value_targets(rewards, (-1.0, 0.0)), [[-0.2, -0.1, 0, 0], [-1.0, -1.0, 0, 0]], rtol=1e-6
    )


def n_step_advantage(
    rewards: jax.Array, values: jax.Array, valid: jax.Array, n: int, value_range: tuple[float, float]
) -> jax.Array:
    """The reference: A_t = clip(sum_{k<n} r_{t+k} + V(o_{t+n})) - V(o_t) over padded episode rows [E, T],
    the bootstrap 0 past the end (as Recap computed it before its data moved into the replay)."""
    steps = rewards.shape[1]
    cumulative = jnp.concatenate([jnp.zeros_like(rewards[:, :1]), jnp.cumsum(rewards, axis=1)], axis=1)
    ahead = jnp.minimum(jnp.arange(steps) + n, steps)  # [T]
    partial = cumulative[:, ahead] - cumulative[:, :steps]
    bootstrap_index = jnp.minimum(ahead, steps - 1)
    bootstrap = jnp.where((ahead < steps) & valid[:, bootstrap_index], values[:, bootstrap_index], 0.0)
    return jnp.clip(partial + bootstrap, *value_range) - values


def test_n_step_advantage_bootstraps_inside_the_episode_and_is_monte_carlo_past_its_end():
    rewards = recap.step_rewards(VALID, SUCCESS, max_steps=10, c_fail=1.0)
    values = jnp.array([[-0.3, -0.1, -0.05, 0.7], [-0.5, -0.9, 0.4, 0.4]])  # values past the end are junk
    one = n_step_advantage(rewards, values, VALID, 1, (-1.0, 0.0))
    # Row 0: t0 -0.1 + V1 - V0 = -0.1 - 0.1 + 0.3 = 0.1; t1 -0.1 - 0.05 + 0.1 = -0.05; t2 (last) 0 + 0.05.
    # Row 1: t0 -0.1 - 0.9 + 0.5 = -0.5; t1 (last) clip(-1) + 0.9 = -0.1.
    np.testing.assert_allclose(one[0, :3], [0.1, -0.05, 0.05], atol=1e-6)
    np.testing.assert_allclose(one[1, :2], [-0.5, -0.1], atol=1e-6)
    two = n_step_advantage(rewards, values, VALID, 2, (-1.0, 0.0))
    # Row 0: t0 -0.2 + V2 + 0.3 = 0.05; t1 -0.1 + 0 (t+2 is past the end) + 0.1 = 0.
    # Row 1: t0 clip(-1.1) = -1, + 0.5 = -0.5.
    np.testing.assert_allclose(two[0, :2], [0.05, 0.0], atol=1e-6)
    np.testing.assert_allclose(two[1, 0], -0.5, atol=1e-6)
    # N at least T: the Monte-Carlo advantage, clipped return minus V.
    mc = n_step_advantage(rewards, values, VALID, 4, (-1.0, 0.0))
    targets = recap.value_targets(rewards, (-1.0, 0.0))
    np.testing.assert_allclose(mc * VALID, (targets - values) * VALID, atol=1e-6)


def test_two_hot_puts_the_value_on_its_two_nearest_bins():
    support = jnp.linspace(-1.0, 0.0, 5)  # -1, -0.75, -0.5, -0.25, 0
    probs = recap.two_hot(jnp.array([-0.6, -1.0, 0.0, -0.75, -3.0]), support)
    np.testing.assert_allclose(
        probs,
        [[0, 0.4, 0.6, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 1], [0, 1, 0, 0, 0], [1, 0, 0, 0, 0]],
        atol=1e-6,
    )  # -0.6 = 0.4 * -0.75 + 0.6 * -0.5; out-of-range values go to the end bins
    np.testing.assert_allclose(probs @ support, [-0.6, -1.0, 0.0, -0.75, -1.0], atol=1e-6)


def test_value_loss_of_a_uniform_categorical_is_log_bins():
    model = configs.get_config("debug").model  # 11 bins
    value = model.create_value(0)
    value.head.kernel[...] = jnp.zeros_like(value.head.kernel[...])
    value.head.bias[...] = jnp.zeros_like(value.head.bias[...])
    graphdef, params = nnx.split(value, nnx.Param)
    obs = model.fake_observation(jax.random.key(0), 3)
    batch = {"obs": obs, "value_target": jnp.array([-0.3, -1.0, 0.0])}
    stats = normalization.compute(jax.device_get(obs))
    loss_fn = functools.partial(
        recap.value_loss, graphdef=graphdef, stats=stats, support=model.value_support()
    )
    loss, metrics = jax.jit(loss_fn)(params, batch)  # one compile, not one per eager op
    np.testing.assert_allclose(loss, np.log(11), rtol=1e-6)
    np.testing.assert_allclose(metrics["value_error"], (0.2 + 0.5 + 0.5) / 3, rtol=1e-5)  # mean V = -0.5


def test_thresholds_by_quantile_per_group_and_corrections_forced_positive():
    advantage = np.array([0.1, 0.5, -0.2, 0.3, 0.9, 0.0])
    group = np.array([0, 0, 0, 1, 1, 1])
    forced = np.array([False, False, False, False, True, False])
    threshold = recap.thresholds(advantage, group, ~forced, {0: 1 / 3, 1: 0.5})
    # Group 0: the 2/3 quantile of (-0.2, 0.1, 0.5) interpolates at position 4/3: 0.1 + 0.4 / 3.
    # Group 1, the forced step left out: the median of (0.3, 0.0) is 0.15.
    assert threshold[0] == pytest.approx(0.1 + 0.4 / 3)
    assert threshold[1] == pytest.approx(0.15)
    got = recap.indicators(advantage, group, forced, threshold)
    np.testing.assert_array_equal(got, [NEG, POS, NEG, POS, POS, NEG])


def test_indicator_dropout_feeds_none_at_the_configured_rate():
    batch = {"indicator": jnp.full((20_000,), POS, jnp.int32), "other": jnp.zeros(3)}
    assert jnp.all(recap.indicator_dropout(batch, jax.random.key(0), rate=0.0)["indicator"] == POS)
    assert jnp.all(recap.indicator_dropout(batch, jax.random.key(0), rate=1.0)["indicator"] == NONE)
    dropped = recap.indicator_dropout(batch, jax.random.key(1), rate=0.3)["indicator"]
    assert set(np.unique(dropped)) == {NONE, POS}
    assert float(jnp.mean(dropped == NONE)) == pytest.approx(0.3, abs=0.02)


def test_classifier_free_guidance_extrapolates_the_mean():
    conditioned, unconditioned = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.0])
    np.testing.assert_allclose(distributions.guided_mean(conditioned, unconditioned, 1.0), conditioned)
    np.testing.assert_allclose(distributions.guided_mean(conditioned, unconditioned, 1.5), [1.25, -3.0])


def test_the_conditioned_policy_starts_as_the_prior_for_every_indicator():
    config = configs.get_config("debug")
    graphdef, params = nnx.split(config.model.create_policy(0), nnx.Param)
    prior = Prior(config.model, "test", graphdef, params, {}, 0, None)
    conditioned_graphdef, conditioned = recap.conditioned_policy(prior, seed=3)
    obs = config.model.fake_observation(jax.random.key(0), 3)
    want = models.apply(graphdef, params, obs)
    for flag in (None, jnp.array([NONE, POS, NEG])):
        got = models.apply(conditioned_graphdef, conditioned, obs, flag)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
    assert (
        dataclasses.replace(config.model, advantage_conditioned=True).create_policy(0).indicator is not None
    )


# ------------------------------------------------------------------------------------------ the replay
TARGETS = recap.Targets(max_steps=10, c_fail=1.0, n=3, value_range=(-1.0, 0.0))
SPEC = {"proprio": jax.ShapeDtypeStruct((7,), jnp.float32)}


def id_block(lengths: list[int], success: list[bool], intervention: dict | None = None) -> dict:
    """Recap's insert block of episodes of these lengths, one a row: proprio[..., 0] is a step's id
    (100 * row + t), proprio[..., 1] a fake value in [-1, 0] for a `predict` that reads it."""
    rows, steps = len(lengths), max(lengths)
    t = np.arange(steps)
    valid = t[None] < np.asarray(lengths)[:, None]
    proprio = np.zeros((rows, steps, 7), np.float32)
    proprio[..., 0] = 100 * np.arange(rows)[:, None] + t[None]
    proprio[..., 1] = -np.random.default_rng(0).random((rows, steps))
    flags = np.zeros((rows, steps), bool)
    for row, at in (intervention or {}).items():
        flags[row, at] = True
    block = {
        "obs": {"proprio": proprio},
        "action": np.zeros((rows, steps, 4), np.float32),
        "reward": np.zeros((rows, steps), np.float32),
        "terminal": valid & (t[None] == np.asarray(lengths)[:, None] - 1),
        "valid": valid,
        "is_first": valid & (t[None] == 0),
        "intervention": flags & valid,
        "version": np.ones((rows, steps), np.int32),
        "reward_source": np.zeros((rows, steps), np.int8),
    }
    return recap.recap_block(block, np.asarray(success), TARGETS)


# Jitted: called eagerly, the shard_map inside replay.insert compiles and dispatches each of its ops alone.
@functools.partial(jax.jit, static_argnames=("source", "mesh", "capacity"))
def filled(block: dict, source: str, mesh, capacity: int = 64) -> replay.Buffer:
    buffer = replay.create(SPEC, 4, capacity, mesh, recap.extras_spec(), n_step=2)
    return replay.insert(buffer, block, source=replay.SOURCES.index(source))


def step_ids(buffer: replay.Buffer) -> np.ndarray:
    return np.asarray(buffer.obs["proprio"][..., 0])[np.asarray(replay.written(buffer))].astype(int)


def fake_value(scale, obs):
    """A `predict` that reads the value written into the observation (`id_block`)."""
    return scale * obs["proprio"][:, 1]


@pytest.mark.parametrize("devices", [1, 4])
def test_advantages_on_the_replay_equal_those_of_the_padded_rows(devices):
    lengths, success = [3, 6, 2, 5], [True, False, True, False]
    block = id_block(lengths, success)
    buffer = filled(block, recap.AUTONOMOUS, sharding.make_mesh(jax.devices()[:devices]))
    advantages = functools.partial(recap.slot_advantages, predict=fake_value, targets=TARGETS)
    got = jax.jit(advantages)(buffer, jnp.float32(1.0))
    written = np.asarray(replay.written(buffer))
    ids = step_ids(buffer)
    values = block["obs"]["proprio"][..., 1]
    valid = jnp.asarray(block["valid"])
    want = n_step_advantage(block["reward"], values, valid, TARGETS.n, TARGETS.value_range)
    np.testing.assert_allclose(
        np.asarray(got["advantage"])[written], np.asarray(want)[ids // 100, ids % 100], atol=1e-6
    )
    # Stored per step at insertion: the value target and the episode's success.
    targets = recap.value_targets(block["reward"], TARGETS.value_range)
    np.testing.assert_allclose(
        np.asarray(buffer.extras["value_target"])[written],
        np.asarray(targets)[ids // 100, ids % 100],
        atol=1e-6,
    )
    stored_success = np.asarray(buffer.extras["success"])[written]
    np.testing.assert_array_equal(stored_success, np.asarray(success)[ids // 100])


def test_only_rollout_corrections_are_forced_and_indicators_go_back_to_their_steps():
    mesh = sharding.make_mesh(jax.devices()[:1])
    # Demonstrations are all the operator's steps, yet not corrections; in a corrected rollout they are.
    buffers = {
        recap.DEMONSTRATIONS: filled(id_block([3], [True], {0: [0, 1, 2]}), recap.DEMONSTRATIONS, mesh),
        recap.CORRECTED: filled(id_block([4], [True], {0: [1, 2]}), recap.CORRECTED, mesh),
    }
    advantages = {k: {"advantage": b.obs["proprio"][..., 0] / 100.0} for k, b in buffers.items()}
    table = recap.step_table(buffers, advantages)
    np.testing.assert_array_equal(table["group"], [recap.DEMOS] * 3 + [recap.ROLLOUTS] * 4)
    np.testing.assert_array_equal(table["forced"], [0, 0, 0, 0, 1, 1, 0])
    np.testing.assert_allclose(table["advantage"], [0, 0.01, 0.02, 0, 0.01, 0.02, 0.03])
    indicator = np.array([POS, NEG, POS, NEG, NEG, POS, POS], np.int32)
    stored = recap.with_indicators(buffers, indicator)
    back = [np.asarray(b.extras["indicator"])[np.asarray(replay.written(b))] for b in stored.values()]
    np.testing.assert_array_equal(np.concatenate(back), indicator)


def test_batches_take_each_source_at_its_configured_share_and_each_shard_draws_its_own_steps():
    rc = configs.RecapConfig(demo_share=0.5, autonomous_per_iteration=8, corrected_per_iteration=16)
    shares = recap.source_shares(rc, demonstrations=True)
    want = {recap.DEMONSTRATIONS: 0.5, recap.AUTONOMOUS: 1 / 6, recap.CORRECTED: 1 / 3}
    assert shares == pytest.approx(want)
    assert recap.source_shares(rc, demonstrations=False) == pytest.approx(
        {recap.AUTONOMOUS: 1 / 3, recap.CORRECTED: 2 / 3}
    )
    mesh = sharding.make_mesh()
    lengths = [8, 12, 6, 10]  # one row, so one episode, per shard
    buffers = {name: filled(id_block(lengths, [True] * 4), name, mesh) for name in shares}
    batch_size, shards = 4096, 4
    ratios = recap.batch_ratios(shares, batch_size, shards)
    draw = functools.partial(recap.draw_batch, batch_size=batch_size, ratios=ratios, chunk=2)
    batch = jax.tree.map(np.asarray, jax.jit(draw)(buffers, jax.random.key(0)))
    assert set(batch) == {"obs", "chunk", "mask", "value_target", "indicator", "source"}
    source = batch["source"]
    # Every batch holds each source's share to within one draw per shard (whole draws on every shard).
    for name, share in shares.items():
        count = int(np.sum(source == replay.SOURCES.index(name)))
        assert abs(count / batch_size - share) <= shards / batch_size, (name, count)
    # Within a source each shard draws uniformly among its own steps: the first half of its episode takes
    # each draw with probability 1/2. A correct sampler fails one of the 2 x 4 x 3 one-sided bounds with
    # probability at most 1e-3 in all.
    ids = batch["obs"]["proprio"][:, 0].astype(int)
    per_shard = batch_size // shards
    for shard in range(shards):
        rows = slice(shard * per_shard, (shard + 1) * per_shard)
        assert np.all(ids[rows] // 100 == shard)  # shard-local: never a step of another shard
        for name in shares:
            mine = ids[rows][source[rows] == replay.SOURCES.index(name)] % 100
            low = fewest_successes(len(mine), 0.5, 1e-3 / 24)
            assert low <= int(np.sum(mine < lengths[shard] // 2)) <= len(mine) - low, (shard, name)


def tiny_prior() -> Prior:
    config = configs.get_config("debug")
    graphdef, params = nnx.split(config.model.create_policy(0), nnx.Param)
    stats = normalization.compute(jax.device_get(config.model.fake_observation(jax.random.key(9), 64)))
    return Prior(config.model, "test", graphdef, params, stats, 0, None)


@pytest.mark.parametrize("network", ["policy", "value"])
def test_a_recap_update_on_four_devices_equals_the_single_device_update(network):
    prior = tiny_prior()
    config, model = configs.get_config("debug"), prior.model
    keys = jax.random.split(jax.random.key(1), 4)
    batch = {
        "obs": model.fake_observation(keys[0], 16),
        "chunk": model.fake_chunk(keys[1], 16),
        "mask": jnp.ones((16, model.chunk), bool),
        "indicator": jax.random.randint(keys[2], (16,), 0, 3),
        "value_target": -jax.random.uniform(keys[3], (16,)),
    }
    if network == "policy":
        graphdef, params = recap.conditioned_policy(prior)
        embedding = params["indicator"]["embedding"]  # zero at the start: give the indicator a gradient path
        params["indicator"]["embedding"] = nnx.Param(jax.random.normal(keys[3], embedding.shape))
        loss_fn = recap.policy_loss_fn(config, prior, graphdef)
        prepare = functools.partial(recap.indicator_dropout, rate=0.3)
    else:
        graphdef, params = nnx.split(model.create_value(1), nnx.Param)
        loss_fn, prepare = recap.value_loss_fn(prior, graphdef), None
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        # Plain SGD: a first Adam step divides by |g| and amplifies float noise in gradients near zero.
        optimizer = optax.sgd(0.1)
        state = bc.init_state(jax.tree.map(jnp.copy, params), optimizer)
        update = recap.make_update(loss_fn, optimizer, sharding.make_mesh(devices), prepare)
        new, metrics = update(state, batch, jax.random.key(2))
        results.append(jax.device_get((new.params, metrics)))
    for one, four in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1]), strict=True):
        np.testing.assert_allclose(np.asarray(one), np.asarray(four), rtol=2e-5, atol=1e-6)
    assert float(results[0][1]["grad_norm"]) > 0  # the update moved the params


def test_a_padded_dataset_is_drawn_from_its_filled_rows_only():
    examples = {"obs": {"proprio": np.arange(3, dtype=np.float32)[:, None]}, "chunk": np.ones((3, 2, 4))}
    data = dataset.pad(examples, capacity=8)
    assert data["chunk"].shape == (8, 2, 4) and int(data["size"]) == 3
    batch = bc.sample_batch(jax.tree.map(jnp.asarray, data), jax.random.key(0), 64)
    assert "size" not in batch and set(np.unique(batch["obs"]["proprio"])) == {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="capacity"):
        dataset.pad(examples, capacity=2)


def test_auroc_by_hand():
    # Positives score 0.35 and 0.8, negatives 0.1 and 0.4: of the 4 pairs, 3 rank the positive higher.
    assert recap.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    # A tie counts half: pairs (1 vs 1) 0.5 and (1 vs 0) 1 -> 0.75; perfect separation 1; one class: None.
    assert recap.auroc(np.array([1.0, 1.0, 0.0]), np.array([1, 0, 0])) == pytest.approx(0.75)
    assert recap.auroc(np.array([0.0, 1.0]), np.array([0, 1])) == 1.0
    assert recap.auroc(np.array([0.0, 1.0]), np.array([1, 1])) is None


def test_the_guided_actor_takes_beta_as_an_input_and_is_the_conditioned_policy_at_one():
    config = configs.get_config("debug")
    model = dataclasses.replace(config.model, advantage_conditioned=True).create_policy(0)
    model.indicator.embedding[...] = jax.random.normal(jax.random.key(3), model.indicator.embedding.shape)
    graphdef, params = nnx.split(model, nnx.Param)
    obs = config.model.fake_observation(jax.random.key(0), 5)
    stats = normalization.compute(jax.device_get(obs))
    act = jax.jit(recap.guided_actor(graphdef, stats))
    key = jax.random.key(0)
    conditioned = evaluate.chunk_actor(graphdef, stats, indicator=POS)(params, obs, key)
    np.testing.assert_allclose(act(recap.with_beta(params, 1.0), obs, key), conditioned, atol=1e-6)
    unconditioned = evaluate.chunk_actor(graphdef, stats)(params, obs, key)
    np.testing.assert_allclose(act(recap.with_beta(params, 0.0), obs, key), unconditioned, atol=1e-6)
    guided = act(recap.with_beta(params, 2.5), obs, key)
    assert float(jnp.max(jnp.abs(guided - conditioned))) > 1e-4
    assert act._cache_size() == 1  # one compile for every beta


def test_jaxvla_recap_has_its_own_defaults_and_the_command_line_overrides_them():
    from tools import recap as recap_command

    def parse(*flags):
        argv = ["debug", *flags]
        return configs.cli(argv, recap_command.PROG, recap_command.SECTIONS, recap_command.DEFAULTS)

    config = parse()
    assert (config.target.split, config.target.eval_episodes, config.recap.demo_share) == ("deploy", 64, 0.5)
    assert configs.get_config("debug").target.eval_episodes == 256  # the registry itself is untouched
    config = parse("--target.split", "novel", "--recap.guidance-sweep", "1", "2")
    assert config.target.split == "novel" and config.recap.guidance_sweep == (1.0, 2.0)


def test_recap_collects_and_evaluates_with_one_compiled_rollout():
    prior = tiny_prior()
    graphdef, params = recap.conditioned_policy(prior)
    # An untrained policy stalls: within 10 steps without progress the operator takes over, where it may.
    trigger = Trigger(stall_steps=10)
    rollouts = recap.Rollouts(
        "pick_place", "deploy", graphdef, prior.stats, trigger, autonomous=4, corrected=4, episodes=4
    )
    contexts = evaluate.TEST.with_episodes(4)
    with compile_cache.CompileClock() as clock:
        first = rollouts.collect(params, jax.random.key(0), 1)
        second = rollouts.collect(params, jax.random.key(1), 2)
        reports = [rollouts.on(recap.with_beta(params, beta), contexts) for beta in (1.0, 2.5)]
    # Two collections (autonomous and corrected episodes each) and two evaluations: one program.
    assert clock.programs["jit(rollouts)"] == 1 and rollouts._run._cache_size() == 1
    for collected, version in ((first, 1), (second, 2)):
        assert set(collected) == {recap.AUTONOMOUS, recap.CORRECTED}
        alone, watched = collected[recap.AUTONOMOUS]["block"], collected[recap.CORRECTED]["block"]
        assert alone["valid"].shape[0] == watched["valid"].shape[0] == 4
        assert patch.effort(alone)["takeover_steps"] == 0  # the operator is off in autonomous episodes
        assert patch.effort(watched)["corrective_episodes"] == 4
        assert int(alone["version"][0, 0]) == int(watched["version"][0, 0]) == version
    assert all(r["episodes"] == 4 and r["contexts"] == "test" for r in reports)
