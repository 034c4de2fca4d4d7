"""The model library: shapes, inputs that must (not) matter, the tanh-Gaussian, and compile-once."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from jaxvla import models
from jaxvla import tokenizer
from jaxvla.models import ModelConfig
from jaxvla.models import distributions
from jaxvla.models import encoders

CONFIGS = {
    "state": ModelConfig(width=32, prompt_dim=8, value_bins=11),
    "state_image_indicator": ModelConfig(
        width=32, prompt_dim=8, image=True, image_res=16, advantage_conditioned=True
    ),
    "transformer": ModelConfig(encoder="transformer", width=32, layers=2, attention_heads=4),
    "transformer_image": configs.get_config("vla_tiny").model,
}


@pytest.mark.parametrize("name", CONFIGS)
def test_every_network_reads_the_described_inputs(name):
    config = CONFIGS[name]
    key_obs, key_chunk = jax.random.split(jax.random.key(0))
    obs = config.fake_observation(key_obs, 3)
    assert {k: v.shape for k, v in obs.items()} == {k: s.shape for k, s in config.observation_spec(3).items()}
    mean, log_std = config.create_policy(0)(obs)
    chex.assert_shape([mean, log_std], (3, config.chunk, config.action_size))
    assert np.all((log_std >= config.log_std_range[0]) & (log_std <= config.log_std_range[1]))
    q = config.create_critic(0)(obs, config.fake_chunk(key_chunk, 3))
    chex.assert_shape(q, (config.ensemble, 3))
    assert not np.allclose(q[0], q[1]), "ensemble members must be initialised independently"
    logits = config.create_value(0)(obs)
    chex.assert_shape(logits, (3, config.value_bins))
    value = models.expected_value(logits, config.value_support())
    assert np.all((value >= config.value_range[0]) & (value <= config.value_range[1]))


@pytest.mark.parametrize("name", ["state", "transformer"])
def test_prompt_words_change_the_policy(name):
    config = CONFIGS[name]
    policy = config.create_policy(0)
    obs = config.fake_observation(jax.random.key(1), 1)
    one = policy(dict(obs, prompt=jnp.asarray(tokenizer.encode("put the red part in compartment 1"))[None]))
    two = policy(dict(obs, prompt=jnp.asarray(tokenizer.encode("put the red part in compartment 2"))[None]))
    assert not np.allclose(one[0], two[0])


def test_prompt_embedding_ignores_padding():
    embedding = encoders.PromptEmbedding(8, dtype=jnp.float32, rngs=nnx.Rngs(0))
    text = "put the red part in compartment 1"
    long, short = (jnp.asarray(tokenizer.encode(text, length=n))[None] for n in (12, 7))
    np.testing.assert_allclose(embedding(long), embedding(short), rtol=1e-6)


def test_advantage_indicator_changes_the_policy():
    config = CONFIGS["state_image_indicator"]
    policy = config.create_policy(0)
    obs = config.fake_observation(jax.random.key(2), 2)
    none = policy(obs)[0]
    np.testing.assert_array_equal(none, policy(obs, jnp.full(2, models.INDICATOR_NONE))[0])
    assert not np.allclose(none, policy(obs, jnp.full(2, models.INDICATOR_POSITIVE))[0])


def test_vla_config_has_about_100m_parameters():
    abstract = nnx.eval_shape(lambda: configs.get_config("vla").model.create_policy(0))
    count = models.count_params(abstract)
    assert 90e6 < count < 120e6, count


def test_tanh_gaussian_log_prob_by_hand():
    # One dimension, mean 0, log_std 0, action tanh(0.5): u = 0.5.
    # log N(0.5; 0, 1) = -0.125 - 0.918939 = -1.043939; log(1 - tanh(0.5)^2) = log(0.786448) = -0.240229.
    # log pi = -1.043939 + 0.240229 = -0.803710.
    action = jnp.full((1, 1), math.tanh(0.5))
    got = distributions.log_prob(jnp.zeros((1, 1)), jnp.zeros((1, 1)), action)
    np.testing.assert_allclose(got, -0.803710, atol=1e-5)


def test_sampled_log_prob_matches_recomputed_log_prob():
    key_mean, key_std, key_sample = jax.random.split(jax.random.key(3), 3)
    mean = jax.random.normal(key_mean, (64, 4, 4))
    log_std = jax.random.uniform(key_std, (64, 4, 4), minval=-2.0, maxval=0.0)
    action, log_prob = distributions.sample(key_sample, mean, log_std)
    chex.assert_shape(log_prob, (64,))
    # Away from the clip at +-1 the two formulas are the same density.
    inside = jnp.all(jnp.abs(action) < distributions.ACTION_CLIP, axis=(-2, -1))
    recomputed = distributions.log_prob(mean, log_std, action)
    np.testing.assert_allclose(log_prob[inside], recomputed[inside], rtol=2e-3, atol=2e-3)


def test_jitted_forward_compiles_once():
    config = CONFIGS["state"]
    graphdef, params = nnx.split(config.create_policy(0), nnx.Param)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, obs):
        return models.apply(graphdef, params, obs)

    for seed in range(3):
        forward(params, config.fake_observation(jax.random.key(seed), 4))


def test_remat_recomputes_the_same_gradients():
    # Recomputing the blocks' activations in the backward pass trades memory for FLOPs, never the numbers.
    plain = CONFIGS["transformer_image"]
    obs = plain.fake_observation(jax.random.key(0), 4)

    def grads(config):
        graphdef, params = nnx.split(config.create_policy(0), nnx.Param)
        loss = lambda params: jnp.sum(models.apply(graphdef, params, obs)[0] ** 2)  # noqa: E731
        return jax.jit(jax.grad(loss))(params)

    chex.assert_trees_all_close(
        grads(plain), grads(dataclasses.replace(plain, remat=True)), rtol=1e-5, atol=1e-6
    )
