"""RIPT: leave-one-out advantages, dynamic sampling, the clipped loss and one PPO step, by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import configs
from jaxvla import normalization
from jaxvla.models import distributions
from learner import ript


def test_leave_one_out_advantage_subtracts_the_mean_of_the_others():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    # Group 0: a success's baseline is (2 - 1) / 3, a failure's (2 - 0) / 3. Group 1: every A is 0.
    want = [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [0.0, 0.0, 0.0, 0.0]]
    np.testing.assert_allclose(ript.leave_one_out_advantage(rewards), want, atol=1e-6)


def test_groups_whose_outcomes_all_agree_are_rejected():
    rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0, 0, 0, 1.0]])
    np.testing.assert_array_equal(ript.informative_groups(rewards), [True, False, False, True])


def test_clipped_surrogate_by_hand():
    ratio = jnp.array([1.5, 0.5, 1.5, 0.5])
    advantage = jnp.array([1.0, 1.0, -1.0, -1.0])
    old = jnp.zeros(4)

    def loss(log_prob, weight):
        return ript.clipped_surrogate(log_prob, old, advantage, weight, 0.2, 0.2)

    # -min(r A, clip(r, 0.8, 1.2) A): -min(1.5, 1.2) = -1.2; -min(0.5, 0.8) = -0.5; -min(-1.5, -1.2) = 1.5;
    # -min(-0.5, -0.8) = 0.8.
    value, metrics = loss(jnp.log(ratio), jnp.ones(4))
    np.testing.assert_allclose(value, (-1.2 - 0.5 + 1.5 + 0.8) / 4, rtol=1e-6)
    assert float(metrics["clip_fraction"]) == 1.0
    np.testing.assert_allclose(loss(jnp.log(ratio), jnp.array([1.0, 1.0, 1.0, 0.0]))[0], -0.2 / 3, rtol=1e-5)
    # The gradient flows only where the unclipped term is the minimum: d(-r A)/d log r = -r A, over 4.
    grad = jax.grad(lambda lp: loss(lp, jnp.ones(4))[0])(jnp.log(ratio))
    np.testing.assert_allclose(grad, [0.0, -0.5 / 4, 1.5 / 4, 0.0], atol=1e-6)


def test_executed_log_prob_scores_only_the_executed_actions():
    key_mean, key_std, key_chunk = jax.random.split(jax.random.key(0), 3)
    mean = jax.random.normal(key_mean, (3, 4, 2))
    log_std = -1.0 + 0.1 * jax.random.normal(key_std, (3, 4, 2))
    chunk = jax.random.normal(key_chunk, (3, 4, 2))
    terms = distributions.pre_tanh_log_prob_terms(mean, log_std, chunk)
    np.testing.assert_allclose(
        ript.executed_log_prob(mean, log_std, chunk, 1), terms[:, 0].sum(-1), rtol=1e-6
    )
    # The whole chunk: the tanh-Gaussian log-probability of tanh(u) plus the squash's log-determinant.
    squashed = distributions.log_prob(mean, log_std, jnp.tanh(chunk))
    log_det = jnp.sum(jnp.log1p(-(jnp.tanh(chunk) ** 2)), axis=(-2, -1))
    np.testing.assert_allclose(ript.executed_log_prob(mean, log_std, chunk, 4), squashed + log_det, rtol=1e-4)


def test_contexts_that_all_succeeded_are_skipped_for_skip_rounds_iterations():
    pool = ript.ContextPool(5, skip_rounds=2, seed=0)
    pool.record(np.array([1, 3]), np.array([[1.0, 1.0], [1.0, 0.0]]), iteration=0)
    assert pool.skipped(1) == 1 and pool.skipped(3) == 0  # context 1 sits out iterations 1 and 2
    for _ in range(10):
        assert 1 not in pool.draw(4, iteration=1)
    drawn = pool.draw(5, iteration=1)  # more contexts asked for than are active: the skipped one comes last
    assert sorted(drawn) == [0, 1, 2, 3, 4] and drawn[-1] == 1
    assert any(1 in pool.draw(4, iteration=3) for _ in range(10))


def test_decisions_weight_only_kept_groups_before_the_episode_end():
    rollouts = {
        "obs": {"proprio": np.zeros((2, 3, 7), np.float32)},
        "chunk": np.zeros((2, 3, 4, 4), np.float32),
        "decided": np.array([[True, True, False], [True, False, False]]),
    }
    data = ript.decisions(rollouts, np.array([0.5, -0.5]), np.array([True, False]))
    np.testing.assert_array_equal(data["weight"], [1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(data["advantage"], [0.5, 0.5, 0.5, -0.5, -0.5, -0.5])
    assert data["obs"]["proprio"].shape == (6, 7) and data["chunk"].shape == (6, 4, 4)


def test_a_ppo_step_raises_the_advantage_weighted_likelihood_and_ignores_rejected_decisions():
    model = configs.get_config("debug").model
    graphdef, params = nnx.split(model.create_policy(0), nnx.Param)
    key_obs, key_sample, key_advantage = jax.random.split(jax.random.key(1), 3)
    obs = model.fake_observation(key_obs, 64)
    stats = normalization.compute(jax.device_get(obs))
    mean, log_std = ript.scaled_policy(graphdef, params, obs, stats, 2.0)
    chunk = distributions.sample_pre_tanh(key_sample, mean, log_std)
    advantage = jax.random.normal(key_advantage, (64,))
    kept = jnp.arange(64) < 48  # the last 16 decisions belong to rejected groups

    @jax.jit
    def log_probs(params):
        mean, log_std = ript.scaled_policy(graphdef, params, obs, stats, 2.0)
        return ript.executed_log_prob(mean, log_std, chunk, 2)

    optimizer = optax.sgd(1e-3)
    step = jax.jit(functools.partial(ript.ppo_epochs, graphdef=graphdef, stats=stats, optimizer=optimizer,
                                     temperature=2.0, execute=2, epochs=1, minibatches=1,
                                     clip=(0.2, 0.2)))  # fmt: skip

    def ppo_step(advantage):
        data = {"obs": obs, "chunk": chunk, "advantage": advantage, "weight": kept.astype(jnp.float32)}
        new, _, metrics = step(
            jax.tree.map(jnp.copy, params), optimizer.init(params), data, jax.random.key(2)
        )
        return log_probs(new) - log_probs(params), metrics

    # At ratio 1 the step is gradient ascent on sum_i A_i log pi(c_i): to first order it raises that sum.
    change, metrics = ppo_step(advantage)
    assert float(jnp.sum(jnp.where(kept, advantage, 0.0) * change)) > 0
    assert float(metrics["ratio"]) == pytest.approx(1.0) and float(metrics["clip_fraction"]) == 0.0
    # Rejected decisions carry no gradient, whatever their advantage.
    changed, _ = ppo_step(jnp.where(kept, advantage, 100.0))
    np.testing.assert_allclose(changed, change, rtol=1e-4, atol=1e-5)
