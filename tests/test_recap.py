"""Recap: rewards, value targets, N-step advantages, thresholds, indicators, the 50:50 sampler, AUROC and
guidance, by hand."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import fewest_successes
from flax import nnx

import configs
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from learner import bc
from learner import dataset
from learner import evaluate
from learner import recap
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


def test_n_step_advantage_bootstraps_inside_the_episode_and_is_monte_carlo_past_its_end():
    rewards = recap.step_rewards(VALID, SUCCESS, max_steps=10, c_fail=1.0)
    values = jnp.array([[-0.3, -0.1, -0.05, 0.7], [-0.5, -0.9, 0.4, 0.4]])  # values past the end are junk
    one = recap.n_step_advantage(rewards, values, VALID, 1, (-1.0, 0.0))
    # Row 0: t0 -0.1 + V1 - V0 = -0.1 - 0.1 + 0.3 = 0.1; t1 -0.1 - 0.05 + 0.1 = -0.05; t2 (last) 0 + 0.05.
    # Row 1: t0 -0.1 - 0.9 + 0.5 = -0.5; t1 (last) clip(-1) + 0.9 = -0.1.
    np.testing.assert_allclose(one[0, :3], [0.1, -0.05, 0.05], atol=1e-6)
    np.testing.assert_allclose(one[1, :2], [-0.5, -0.1], atol=1e-6)
    two = recap.n_step_advantage(rewards, values, VALID, 2, (-1.0, 0.0))
    # Row 0: t0 -0.2 + V2 + 0.3 = 0.05; t1 -0.1 + 0 (t+2 is past the end) + 0.1 = 0.
    # Row 1: t0 clip(-1.1) = -1, + 0.5 = -0.5.
    np.testing.assert_allclose(two[0, :2], [0.05, 0.0], atol=1e-6)
    np.testing.assert_allclose(two[1, 0], -0.5, atol=1e-6)
    # N at least T: the Monte-Carlo advantage, clipped return minus V.
    mc = recap.n_step_advantage(rewards, values, VALID, 4, (-1.0, 0.0))
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
    prior = Prior(config, graphdef, params, {}, 0, None)
    conditioned_graphdef, conditioned = recap.conditioned_policy(prior, seed=3)
    obs = config.model.fake_observation(jax.random.key(0), 3)
    want = models.apply(graphdef, params, obs)
    for flag in (None, jnp.array([NONE, POS, NEG])):
        got = models.apply(conditioned_graphdef, conditioned, obs, flag)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got, want)
    assert (
        dataclasses.replace(config.model, advantage_conditioned=True).create_policy(0).indicator is not None
    )


def test_flattened_steps_follow_the_example_order_and_unflatten_back():
    obs = {"proprio": np.arange(8, dtype=np.float32).reshape(2, 4, 1)}
    block = recap.Block(obs, np.zeros((2, 4, 2), np.float32), np.asarray(VALID), np.zeros((2, 4), bool),
                        np.asarray(SUCCESS), recap.ROLLOUTS)  # fmt: skip
    examples = recap.flat_examples([block], chunk=2)
    np.testing.assert_array_equal(examples["obs"]["proprio"][:, 0], [0, 1, 2, 4, 5])  # valid steps, by row
    np.testing.assert_array_equal(examples["mask"], [[1, 1], [1, 1], [1, 0], [1, 1], [1, 0]])
    per_step = np.arange(8, dtype=np.float32).reshape(2, 4) * 10
    flat = recap.flat_steps([per_step], [block])
    np.testing.assert_array_equal(flat, [0, 10, 20, 40, 50])
    np.testing.assert_array_equal(recap.unflatten(flat, [block])[0], per_step * np.asarray(VALID))


def test_only_rollout_takeovers_are_forced_positive_not_demonstrations():
    insert_block = {
        "obs": {"proprio": np.zeros((1, 3, 7), np.float32)},
        "action": np.zeros((1, 3, 4), np.float32),
        "valid": np.ones((1, 3), bool),
        "intervention": np.array([[False, True, True]]),
    }
    rollout = recap.Block.from_insert_block(insert_block, [True], recap.ROLLOUTS, ("proprio",))
    demo = recap.Block.from_insert_block(insert_block, [True], recap.DEMOS, ("proprio",))
    np.testing.assert_array_equal(rollout.forced, [[False, True, True]])
    assert not demo.forced.any()


def test_a_padded_dataset_is_drawn_from_its_filled_rows_only():
    examples = {"obs": {"proprio": np.arange(3, dtype=np.float32)[:, None]}, "chunk": np.ones((3, 2, 4))}
    data = dataset.pad(examples, capacity=8)
    assert data["chunk"].shape == (8, 2, 4) and int(data["size"]) == 3
    batch = bc.sample_batch(jax.tree.map(jnp.asarray, data), jax.random.key(0), 64)
    assert "size" not in batch and set(np.unique(batch["obs"]["proprio"])) == {0.0, 1.0, 2.0}
    with pytest.raises(ValueError, match="capacity"):
        dataset.pad(examples, capacity=2)


def test_the_two_source_sampler_draws_demonstrations_and_collected_steps_half_and_half():
    # 1,000 demonstration rows, 50 collected rows, padding up to 1,100: a uniform draw would take the
    # collected rows 50 / 1,050 of the time.
    demo_size, size, capacity, draws = 1_000, 1_050, 1_100, 20_000
    data = {"row": jnp.arange(capacity), "size": jnp.int32(size), "demo_size": jnp.int32(demo_size)}
    batch = recap.two_source_batch(data, jax.random.key(0), draws, demo_share=0.5)
    assert set(batch) == {"row"}
    rows = np.asarray(batch["row"])
    assert rows.min() >= 0 and rows.max() < size  # never the padding
    collected = int(np.sum(rows >= demo_size))
    # Each draw is collected with probability 1/2: a correct sampler lands below `low` with probability at
    # most 5e-4, and above `draws - low` (the mirror image) with at most 5e-4.
    low = fewest_successes(draws, 0.5, 5e-4)
    assert low <= collected <= draws - low, collected
    # Within a source the draw is uniform: the first half of the demonstrations takes half of its draws.
    demo_rows = rows[rows < demo_size]
    low = fewest_successes(len(demo_rows), 0.5, 5e-4)
    assert low <= int(np.sum(demo_rows < demo_size // 2)) <= len(demo_rows) - low


def test_the_two_source_sampler_is_uniform_while_a_source_is_empty():
    data = {"row": jnp.arange(8), "size": jnp.int32(5), "demo_size": jnp.int32(5)}
    rows = np.asarray(recap.two_source_batch(data, jax.random.key(1), 4_000, demo_share=0.5)["row"])
    assert set(np.unique(rows)) == {0, 1, 2, 3, 4}
    data = {**data, "demo_size": jnp.int32(0)}
    rows = np.asarray(recap.two_source_batch(data, jax.random.key(1), 4_000, demo_share=0.5)["row"])
    assert set(np.unique(rows)) == {0, 1, 2, 3, 4}


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


def test_jaxvla_recap_defaults_to_deploy_and_the_command_line_overrides_it():
    from tools import recap as recap_command

    config = configs.cli_with_defaults(["debug"], recap_command.PROG, "recap", recap_command.DEFAULTS)
    assert config.recap.split == "deploy" and config.recap.demo_share == 0.5
    assert configs.get_config("debug").recap.split == "novel"  # the registry itself is untouched
    argv = ["debug", "--recap.split", "novel", "--recap.guidance-sweep", "1", "2"]
    config = configs.cli_with_defaults(argv, recap_command.PROG, "recap", recap_command.DEFAULTS)
    assert config.recap.split == "novel" and config.recap.guidance_sweep == (1.0, 2.0)
