"""RIPT: leave-one-out advantages, dynamic sampling, the RL likelihood, the clipped loss with its KL term
and PPO steps, by hand."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from jaxvla import models
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


def test_decisions_weight_each_kept_rollout_the_same_and_rejected_ones_zero():
    rollouts = {
        "obs": {"proprio": np.zeros((3, 3, 7), np.float32)},
        "chunk": np.zeros((3, 3, 4, 4), np.float32),
        "decided": np.array([[True, True, False], [True, False, False], [True, True, True]]),
    }
    data = ript.decisions(rollouts, np.array([0.5, -0.5, 1.0]), np.array([True, True, False]))
    # Rollout 0 took 2 decisions (1/2 each), rollout 1 one (1), rollout 2 was rejected.
    np.testing.assert_allclose(data["weight"], [0.5, 0.5, 0, 1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(data["advantage"], [0.5] * 3 + [-0.5] * 3 + [1.0] * 3)
    assert data["obs"]["proprio"].shape == (9, 7) and data["chunk"].shape == (9, 4, 4)


def test_the_loss_is_the_mean_over_rollouts_of_each_rollouts_mean():
    decided = np.array([[True, False, False, False], [True, True, True, True]])
    weight = ript.rollout_weights(decided, np.array([True, True])).reshape(-1)
    per_decision = jnp.array([4.0, 0, 0, 0, 1.0, 2.0, 3.0, 6.0])
    # Rollout means 4 and (1 + 2 + 3 + 6) / 4 = 3: their mean is 3.5 (a mean over decisions: 16 / 5).
    np.testing.assert_allclose(ript.weighted_mean(per_decision, weight), 3.5, rtol=1e-6)


def test_gaussian_kl_by_hand():
    # KL(N(1, 1) || N(0, 2^2)) = log 2 + (1 + 1) / 8 - 1/2 = 0.693147 - 0.25; KL(p || p) = 0.
    got = ript.gaussian_kl(
        jnp.array([1.0, 0.3]), jnp.array([0.0, -1.0]), jnp.array([0.0, 0.3]), jnp.array([jnp.log(2.0), -1.0])
    )
    np.testing.assert_allclose(got, [np.log(2.0) - 0.25, 0.0], atol=1e-6)


def small_problem(n: int = 64, kept: int = 48):
    """A debug-size network, RIPT params, raw observations with their stats, sampled chunks, advantages
    and per-decision weights (the last n - kept decisions rejected)."""
    model = configs.get_config("debug").model
    graphdef, network = nnx.split(model.create_policy(0), nnx.Param)
    params = ript.rl_params(network, model.action_size, 0.15)
    key_obs, key_sample, key_advantage = jax.random.split(jax.random.key(1), 3)
    obs = model.fake_observation(key_obs, n)
    stats = normalization.compute(jax.device_get(obs))
    likelihood = ript.Likelihood(floor=0.05, temperature=2.0)
    mean, log_std = likelihood(graphdef, params, obs, stats)
    chunk = distributions.sample_pre_tanh(key_sample, mean, log_std)
    weight = (jnp.arange(n) < kept).astype(jnp.float32)
    data = {"obs": obs, "chunk": chunk, "advantage": jax.random.normal(key_advantage, (n,)), "weight": weight}
    return graphdef, params, stats, likelihood, data


def test_the_rl_std_is_independent_of_the_bc_fit():
    graphdef, params, stats, likelihood, data = small_problem()
    model = configs.get_config("debug").model
    half = model.chunk * model.action_size  # the head's outputs: [mean | BC log-std], each H * A wide

    def bc_fit(bias: float):
        """The network with its BC log-std outputs set to a constant (its mean outputs untouched)."""
        policy = nnx.merge(graphdef, jax.tree.map(jnp.copy, params["policy"]))  # merge shares variables
        policy.head.kernel[...] = policy.head.kernel[...].at[:, half:].set(0.0)
        policy.head.bias[...] = policy.head.bias[...].at[half:].set(bias)
        return nnx.split(policy, nnx.Param)[1]

    wide, narrow = bc_fit(2.0), bc_fit(-2.0)
    bc_std = lambda network: models.apply(graphdef, network, normalization.normalize(data["obs"], stats))[1]  # noqa: E731
    assert float(jnp.min(bc_std(wide) - bc_std(narrow))) > 3.0  # e^1 against the e^-5 floor
    params = {**params, "policy": wide}
    refit = narrow
    before = likelihood(graphdef, params, data["obs"], stats)
    after = likelihood(graphdef, {**params, "policy": refit}, data["obs"], stats)
    jax.tree.map(np.testing.assert_array_equal, after, before)
    # The RL std is the params' own (x the temperature 2), one per action dimension, with its own floor.
    np.testing.assert_allclose(jnp.exp(before[1]), 0.3, rtol=1e-6)
    low = likelihood(graphdef, {**params, "log_std": jnp.full(4, -9.0)}, data["obs"], stats)[1]
    np.testing.assert_allclose(jnp.exp(low), 2 * 0.05, rtol=1e-6)
    # Nor does the PPO loss reach the BC std through its gradient.
    batch = {**data, "old_log_prob": jnp.zeros(64)}
    grads = jax.grad(
        lambda p: ript.ppo_loss(
            p,
            batch,
            params,
            graphdef=graphdef,
            stats=stats,
            likelihood=likelihood,
            execute=2,
            clip=(0.2, 0.2),
            kl_coef=0.1,
        )[0]
    )(params)
    assert float(jnp.max(jnp.abs(grads["policy"]["head"]["kernel"][...][:, half:]))) == 0.0
    assert float(jnp.max(jnp.abs(grads["log_std"]))) > 0.0


def test_the_kl_term_is_added_to_the_surrogate_and_vanishes_at_the_reference():
    graphdef, params, stats, likelihood, data = small_problem()
    kwargs = {
        "graphdef": graphdef,
        "stats": stats,
        "likelihood": likelihood,
        "execute": 2,
        "clip": (0.2, 0.2),
    }
    mean, log_std = likelihood(graphdef, params, data["obs"], stats)
    old = ript.executed_log_prob(mean, log_std, data["chunk"], 2)
    batch = {**data, "old_log_prob": old}
    # A reference whose std is half: per executed dimension KL = log(1/2) + 4 / 2 - 1/2 = 1.5 - log 2, and
    # H' x A = 2 x 4 dimensions per decision, whatever its weight.
    reference = {**params, "log_std": params["log_std"] - jnp.log(2.0)}
    surrogate, metrics = ript.ppo_loss(params, batch, params, kl_coef=0.5, **kwargs)
    assert float(metrics["kl"]) == pytest.approx(0.0, abs=1e-6)
    loss, metrics = ript.ppo_loss(params, batch, reference, kl_coef=0.5, **kwargs)
    np.testing.assert_allclose(metrics["kl"], 8 * (1.5 - np.log(2.0)), rtol=1e-5)
    np.testing.assert_allclose(loss, surrogate + 0.5 * 8 * (1.5 - np.log(2.0)), rtol=1e-5)


def ppo_run(params, data, *, epochs: int, learning_rate: float = 1e-3):
    graphdef, _, stats, likelihood, _ = small_problem()
    optimizer = ript.make_optimizer(learning_rate, 1e-2)
    step = jax.jit(
        functools.partial(
            ript.ppo_epochs,
            graphdef=graphdef,
            stats=stats,
            optimizer=optimizer,
            likelihood=likelihood,
            execute=2,
            epochs=epochs,
            minibatches=1,
            clip=(0.2, 0.2),
            kl_coef=0.0,
        )
    )
    copy = jax.tree.map(jnp.copy, params)
    return step(copy, optimizer.init(copy), data, jax.random.key(2), params)


def test_the_ppo_ratio_is_exactly_one_at_the_first_epoch():
    _, params, _, _, data = small_problem()
    _, _, metrics = ppo_run(params, data, epochs=3)
    assert metrics["ratio_deviation"].shape == (3, 1)
    # The first epoch scores the chunks under the very params that define pi_old: the ratio is 1 to the
    # bit, so the sampling policy and the one in the ratio are the same. Later epochs have moved.
    assert float(metrics["ratio_deviation"][0, 0]) == 0.0 and float(metrics["clip_fraction"][0, 0]) == 0.0
    assert float(metrics["ratio_deviation"][1, 0]) > 0.0 and float(metrics["ratio_deviation"][2, 0]) > 0.0
    summary = ript.update_summary(metrics)
    assert summary["max_ratio_deviation"] == float(jnp.max(metrics["ratio_deviation"]))
    assert 0.0 <= summary["last_epoch_clip_fraction"] <= 1.0


def test_a_ppo_step_raises_the_advantage_weighted_likelihood_and_ignores_rejected_decisions():
    graphdef, params, stats, likelihood, data = small_problem()
    kept = data["weight"] > 0

    @jax.jit
    def log_probs(params):
        mean, log_std = likelihood(graphdef, params, data["obs"], stats)
        return ript.executed_log_prob(mean, log_std, data["chunk"], 2)

    def change(advantage):
        new, _, _ = ppo_run(params, {**data, "advantage": advantage}, epochs=1, learning_rate=1e-4)
        return log_probs(new) - log_probs(params)

    # At ratio 1 the step is gradient ascent on sum_i A_i log pi(c_i): to first order it raises that sum.
    delta = change(data["advantage"])
    assert float(jnp.sum(jnp.where(kept, data["advantage"], 0.0) * delta)) > 0
    # Rejected decisions carry no gradient, whatever their advantage.
    np.testing.assert_allclose(change(jnp.where(kept, data["advantage"], 100.0)), delta, rtol=1e-4, atol=1e-5)


def test_jaxvla_ript_has_its_own_defaults_and_the_command_line_overrides_them():
    from tools import ript as ript_command

    def parse(*flags):
        argv = ["debug", *flags]
        return configs.cli(argv, ript_command.PROG, ript_command.SECTIONS, ript_command.DEFAULTS)

    config = parse()
    assert config.target.split == "deploy" and config.ript.starts == (0, 1, 4)
    assert config.model == configs.get_config("debug").model  # only the sections in DEFAULTS change
    config = parse("--target.split", "tail")
    assert config.target.split == "tail"
    few_shot = ript_command.start_config(config, 4)
    assert (few_shot.target.split, few_shot.ript.sft_demos) == ("novel", 4)
    assert ript_command.start_config(config, 0).target.split == "tail"


def test_few_shot_demonstrations_are_repeated_to_their_share_of_the_sft_data():
    from tools import ript as ript_command

    # 50 few-shot examples beside 10,000 offline ones at share 0.5: 0.5 / 0.5 * 10000 / 50 = 200 copies,
    # 10,000 of 20,000 examples; at 0.8: 4 * 200 = 800 copies, 40,000 of 50,000.
    assert ript_command.few_shot_copies(50, 10_000, 0.5) == 200
    assert ript_command.few_shot_copies(50, 10_000, 0.8) == 800
    # Share 0, or a share already exceeded by a single copy: the demonstrations appear once.
    assert ript_command.few_shot_copies(50, 10_000, 0.0) == 1
    assert ript_command.few_shot_copies(5_000, 100, 0.5) == 1
    with pytest.raises(ValueError, match="sft_share"):
        configs.RiptConfig(sft_share=1.0)


def test_the_std_probe_counts_success_kept_and_all_failed_groups():
    from tools import ript as ript_command

    rewards = np.array([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], np.float32)
    # 6 of 12 rollouts succeed; only the first group's outcomes differ; only the second all fails.
    assert ript_command.group_figures(rewards) == {
        "contexts": 3,
        "rollout_success": 0.5,
        "kept_fraction": pytest.approx(1 / 3),
        "all_fail_fraction": pytest.approx(1 / 3),
    }
    assert ript_command.group_figures(rewards[:0]) == {"contexts": 0}
