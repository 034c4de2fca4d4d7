"""SAC over action chunks: losses against hand-computed values, and the update across meshes and processes."""

import dataclasses
import functools
import math
import operator
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from jaxvla import normalization
from learner import evaluate
from learner import replay
from learner import residual
from learner import sac
from learner import sharding
from learner.pretrain import Prior

HERE = pathlib.Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------- losses
def test_ensemble_min_takes_the_min_over_all_or_over_a_random_subset():
    q = jnp.array([[1.0, 5.0], [3.0, 2.0], [0.0, 4.0]])  # [E=3, B=2]
    np.testing.assert_allclose(sac.ensemble_min(q, jax.random.key(0), 0), [0.0, 2.0])
    np.testing.assert_allclose(sac.ensemble_min(q, jax.random.key(0), 3), [0.0, 2.0])
    pairs = {(0, 1): [1.0, 2.0], (0, 2): [0.0, 4.0], (1, 2): [0.0, 2.0]}
    seen = set()
    for seed in range(20):
        got = np.asarray(sac.ensemble_min(q, jax.random.key(seed), 2))
        match = [pair for pair, want in pairs.items() if np.allclose(got, want)]
        assert match, f"{got} is not the min of any pair of members"
        seen.update(match)
    assert len(seen) > 1, "the subset is not random"


def test_td_target_discounts_the_bootstrap_and_stops_at_terminals():
    reward = jnp.array([0.5, 1.0])
    discount = jnp.array([0.9**4, 0.0])
    next_q = jnp.array([2.0, 7.0])
    np.testing.assert_allclose(sac.td_target(reward, discount, next_q), [0.5 + 0.6561 * 2.0, 1.0], rtol=1e-6)


def test_critic_loss_is_the_weighted_mean_squared_error_over_members():
    q = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    target = jnp.array([2.0, 2.0])
    # member 0: errors 1, 0; member 1: errors 1, 4.
    np.testing.assert_allclose(sac.critic_loss_value(q, target, jnp.array([1.0, 1.0])), (0.5 + 2.5) / 2)
    np.testing.assert_allclose(sac.critic_loss_value(q, target, jnp.array([1.0, 0.0])), 1.0)


def test_actor_loss_trades_entropy_against_the_mean_q():
    q = jnp.array([[1.0, 3.0], [3.0, 5.0]])  # mean over members: 2, 4
    log_prob = jnp.array([-1.0, -2.0])
    loss = sac.actor_loss_value(q, log_prob, jnp.float32(0.5), jnp.ones(2))
    np.testing.assert_allclose(loss, ((0.5 * -1 - 2) + (0.5 * -2 - 4)) / 2)


def test_temperature_falls_while_entropy_is_above_target():
    log_alpha = jnp.log(0.1)
    log_prob = jnp.array([-1.0, -3.0])  # entropy 2, above the target of -4
    loss, grad = jax.value_and_grad(sac.temperature_loss_value)(log_alpha, log_prob, -4.0, jnp.ones(2))
    np.testing.assert_allclose(loss, -0.1 * ((-1 - 4) + (-3 - 4)) / 2, rtol=1e-6)
    assert grad > 0  # gradient descent lowers alpha
    _, grad = jax.value_and_grad(sac.temperature_loss_value)(log_alpha, jnp.array([10.0]), -4.0, jnp.ones(1))
    assert grad < 0


def test_soft_update_moves_the_target_by_tau():
    target = {"w": jnp.zeros(3)}
    online = {"w": jnp.ones(3)}
    np.testing.assert_allclose(sac.soft_update(target, online, 0.005)["w"], 0.005)


# ----------------------------------------------------------------------------------------- updates
def small_setup(utd: int = 2, batch: int = 8, **sac_overrides):
    """The debug model's spec, a fresh SAC state and `utd + 1` random normalised batches."""
    config = configs.get_config("debug")
    mc = config.model
    sc = configs.SACConfig(batch_size=batch, utd=utd, critic_warmup=0, **sac_overrides)
    graphdef, actor = nnx.split(mc.create_policy(0), nnx.Param)
    critic_graphdef, critic = nnx.split(mc.create_critic(1), nnx.Param)
    optimizers = sac.make_optimizers(sc)
    state = sac.init_state(actor, critic, sc.init_alpha, optimizers)
    keys = jax.random.split(jax.random.key(2), 6)
    n = (utd + 1) * batch
    obs = mc.fake_observation(keys[0], n)
    stats = normalization.compute(jax.device_get(obs))
    nets = sac.Networks(actor=graphdef, critic=critic_graphdef, stats=stats)
    spec = sac.Spec(sc, mc.chunk, mc.action_size, nets, optimizers)
    flat = {
        "obs": normalization.normalize(obs, stats),
        "next_obs": normalization.normalize(mc.fake_observation(keys[1], n), stats),
        "chunk": mc.fake_chunk(keys[2], n),
        "chunk_mask": jnp.ones((n, mc.chunk), bool),
        "reward": jax.random.bernoulli(keys[3], 0.3, (n,)).astype(jnp.float32),
        "discount": jnp.where(jax.random.bernoulli(keys[4], 0.2, (n,)), 0.0, sc.gamma**mc.chunk),
        "weight": jnp.ones(n),
        "source": jax.random.randint(keys[5], (n,), 0, len(replay.SOURCES)).astype(jnp.int8),
    }
    batches = jax.tree.map(lambda x: x.reshape(utd + 1, batch, *x.shape[1:]), flat)
    return spec, state, batches


def test_critic_regresses_onto_a_fixed_target():
    spec, state, batches = small_setup(target_subset=0)
    batch = jax.tree.map(lambda x: x[0], batches)
    batch = {
        **batch,
        "reward": jnp.full_like(batch["reward"], 0.7),
        "discount": jnp.zeros_like(batch["discount"]),
    }
    step = jax.jit(lambda s, k: sac.critic_update(s, batch, k, spec=spec))
    first = None
    for i in range(300):
        state, metrics = step(state, jax.random.key(i))
        first = first if first is not None else float(metrics["critic_loss"])
    assert float(metrics["critic_loss"]) < 0.01 < first
    np.testing.assert_allclose(float(metrics["q"]), 0.7, atol=0.05)


def test_actor_update_is_held_during_warmup_and_bc_only_sees_the_bc_sources():
    spec, state, batches = small_setup(bc_weight=1.0, bc_sources=("patch",))
    batch = jax.tree.map(lambda x: x[0], batches)
    actor_update = jax.jit(functools.partial(sac.actor_update, spec=spec))  # compiled once, called thrice
    held, _ = actor_update(state, batch, jax.random.key(0), enabled=jnp.bool_(False))
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), held.actor, state.actor)
    assert all(jax.tree.leaves(chex_equal))
    moved, metrics = actor_update(state, batch, jax.random.key(0), enabled=jnp.bool_(True))
    assert not all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), moved.actor, state.actor))
    )
    assert float(metrics["bc"]) > 0
    offline_only = {**batch, "source": jnp.zeros_like(batch["source"])}
    _, metrics = actor_update(state, offline_only, jax.random.key(0), enabled=jnp.bool_(True))
    assert float(metrics["bc"]) == 0.0


def assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_the_spec_is_one_static_argument_and_a_second_call_does_not_recompile():
    spec, state, batches = small_setup()
    assert hash(spec) == hash(spec)
    update = jax.jit(sac.update, static_argnames="spec")
    state, _ = update(state, batches, jax.random.key(0), spec=spec)
    update(state, batches, jax.random.key(1), spec=spec)
    assert update._cache_size() == 1


def test_update_on_four_devices_equals_the_single_device_update():
    assert jax.device_count() >= 4
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        spec, state, batches = small_setup(batch=16)
        update = sac.make_update(spec, sharding.make_mesh(devices))
        new, metrics = update(state, batches, jax.random.key(3))
        assert new.actor["head"]["kernel"][...].sharding.is_fully_replicated
        results.append(jax.device_get((new, metrics)))
    assert_trees_close(*results)


def test_draw_batches_are_the_batches_of_each_key_drawn_alone():
    """The vectorised draw of a train step's batches, on four devices, against one `sample_mixed` per key."""
    config = configs.get_config("debug")
    mc, sc = config.model, configs.SACConfig(batch_size=16, utd=2)
    mesh = sharding.make_mesh()
    rows, steps = 4, 12
    obs = mc.fake_observation(jax.random.key(0), rows * steps)
    stats = normalization.compute(jax.device_get(obs))
    block = {
        "obs": {k: v.reshape(rows, steps, *v.shape[1:]) for k, v in obs.items()},
        "action": jax.random.uniform(jax.random.key(1), (rows, steps, mc.action_size)),
        "reward": jax.random.normal(jax.random.key(2), (rows, steps)),
        "terminal": jnp.zeros((rows, steps), bool).at[:, 7].set(True),
        "valid": jnp.ones((rows, steps), bool),
        "is_first": jnp.zeros((rows, steps), bool).at[:, [0, 8]].set(True),
        "intervention": jnp.zeros((rows, steps), bool),
        "version": jnp.zeros((rows, steps), jnp.int32),
        "reward_source": jnp.zeros((rows, steps), jnp.int8),
    }
    spec = {k: jax.ShapeDtypeStruct(v.shape[1:], v.dtype) for k, v in obs.items()}
    buffers = {
        name: replay.insert(replay.create(spec, mc.action_size, 64, mesh, n_step=mc.chunk), block, source=i)
        for i, name in enumerate(replay.SOURCES)
    }
    nets = sac.Networks(nnx.graphdef(mc.create_policy(0)), nnx.graphdef(mc.create_critic(1)), stats)
    draw = jax.jit(
        functools.partial(
            sac.draw_batches, spec=sac.make_spec(sc, mc, nets), batch_sharding=sharding.batch_sharded(mesh)
        )
    )
    key = jax.random.key(3)
    got = draw(buffers, key)
    assert jax.tree.leaves(got)[0].shape[:2] == (sc.utd + 1, sc.batch_size)
    alone = jax.jit(
        lambda buffers, key: sac.normalize_batch(
            replay.sample_mixed(
                buffers, sac.mix_ratios(sc), key, sc.batch_size, chunk=mc.chunk, gamma=sc.gamma
            ),
            stats,
        )
    )
    for i, key_batch in enumerate(jax.random.split(key, sc.utd + 1)):
        assert_trees_close(jax.tree.map(operator.itemgetter(i), got), alone(buffers, key_batch))
    hlo = draw.lower(buffers, key).compile().as_text()
    assert not [c for c in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if c in hlo]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_one_update_across_two_processes_equals_the_single_process_update(tmp_path):
    """Two `jax.distributed` processes on loopback, two CPU devices each, one sharded update."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": str(HERE.parent),
    }
    worker = HERE / "sac_distributed_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = []
    for proc in procs:
        try:
            outputs.append(proc.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    got = np.load(tmp_path / "update.npz")
    assert int(got["global_devices"]) == 4 and int(got["processes"]) == 2

    spec, state, batches = small_setup(batch=16)
    update = sac.make_update(spec, sharding.make_mesh(jax.devices()[:1]))
    new, _ = update(state, batches, jax.random.key(3))
    want = jax.tree.leaves(jax.device_get((new.actor, new.critic, new.log_alpha)))
    assert len(want) == int(got["leaves"])
    for i, leaf in enumerate(want):
        np.testing.assert_allclose(got[f"leaf{i}"], np.asarray(leaf), rtol=2e-5, atol=1e-6)
    assert not math.isnan(float(got["critic_loss"]))


# ------------------------------------------------------------------------------- the residual learner
def tiny_prior(seed: int = 0) -> Prior:
    """An untrained debug chunk policy with statistics of fake observations, as a frozen prior."""
    config = configs.get_config("debug")
    graphdef, params = nnx.split(config.model.create_policy(seed), nnx.Param)
    stats = normalization.compute(jax.device_get(config.model.fake_observation(jax.random.key(0), 256)))
    return Prior(config.model, "test", graphdef, params, stats, 0, pathlib.Path("unused"))


def residual_setup(**sac_overrides):
    prior = tiny_prior()
    sc = configs.SACConfig(batch_size=8, utd=2, critic_warmup=0, ensemble=4, **sac_overrides)
    nets, actor, critic = residual.create_networks(prior, sc, seed=0)
    spec = residual.make_spec(sc, prior.model, nets)
    state = residual.init_state(prior.params, actor, critic, sc.init_alpha, spec.optimizers)
    return prior, spec, state


def test_the_residual_actor_at_initialisation_executes_exactly_the_priors_actions():
    prior, spec, state = residual_setup()
    sc, nets = spec.config, spec.nets
    obs = prior.model.fake_observation(jax.random.key(5), 32)
    want = evaluate.chunk_actor(prior.graphdef, prior.stats)(prior.params, obs, jax.random.key(0))
    got = residual.actor_fn(nets)(residual.deployable(nets, state), obs, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # Exploring, the residual's noise moves each dimension by at most its scale: the motion's, the valve's.
    explored = residual.actor_fn(nets, explore=True)(residual.deployable(nets, state), obs, jax.random.key(1))
    gap = np.abs(np.asarray(explored) - np.asarray(want)).max(axis=0)
    assert nets.scale == (sc.residual_scale,) * 3 + (sc.residual_valve_scale,)
    assert np.all(gap <= np.asarray(nets.scale) + 1e-6) and gap.max() > 0


def test_selecting_executes_the_prior_or_the_patched_action_whichever_the_critic_rates_higher():
    prior, spec, state = residual_setup(residual_select=True)
    nets = spec.nets
    obs = prior.model.fake_observation(jax.random.key(5), 64)
    # A residual that moves every action: shift the head's bias, so patched and prior actions differ.
    moved = jax.tree.map(lambda x: x + 0.3, state.actor_average)
    params = {**residual.deployable(nets, state), "residual": moved}
    assert set(params) == {"prior", "residual", "critic"}
    got = np.asarray(residual.actor_fn(nets)(params, obs, jax.random.key(0)))
    patched = np.asarray(residual.actor_fn(dataclasses.replace(nets, select=False))(params, obs, None))
    normalised = normalization.normalize(obs, nets.stats)
    base = residual.base_action(nets, state.prior, normalised)
    value = lambda a: np.asarray(  # noqa: E731
        residual.pessimistic_value(residual.q_values(nets, state.critic, normalised, a, base), 1.0)
    )
    prefer = value(jnp.asarray(patched)) > value(base)
    assert 0 < prefer.sum() < len(prefer)  # the random critic splits the batch: both branches are taken
    np.testing.assert_array_equal(got[prefer], patched[prefer])
    np.testing.assert_array_equal(got[~prefer], np.asarray(base)[~prefer])


def test_compose_and_the_bc_target_invert_each_other_within_the_scale():
    base = jnp.array([[0.5, -0.9, 0.0]])
    executed = jnp.array([[0.7, -1.0, 1.0]])
    target = residual.residual_target(executed, base, 0.4)
    # (0.7 - 0.5) / 0.4 = 0.5; (-1 + 0.9) / 0.4 = -0.25; (1 - 0) / 0.4 = 2.5, clipped to the range: 1.
    np.testing.assert_allclose(target, [[0.5, -0.25, 1.0]], rtol=1e-6)
    np.testing.assert_allclose(residual.compose(base, target, 0.4), [[0.7, -1.0, 0.4]], rtol=1e-6)
    # Per dimension: a valve scale of 2 reaches a command of +1 from -0.9 (a motion scale of 0.4 cannot).
    scale = (0.4, 0.4, 2.0)
    valve = residual.residual_target(jnp.array([[0.5, -0.9, 1.0]]), jnp.array([[0.5, -0.9, -0.9]]), scale)
    np.testing.assert_allclose(valve, [[0.0, 0.0, 0.95]], rtol=1e-6)
    np.testing.assert_allclose(
        residual.compose(jnp.array([[0.5, -0.9, -0.9]]), valve, scale), [[0.5, -0.9, 1.0]], rtol=1e-6
    )


def test_the_actor_follows_a_lower_confidence_bound_over_the_ensemble():
    q = jnp.array([[1.0, 2.0], [3.0, 2.0]])  # member means 2 and 2; stds 1 and 0
    np.testing.assert_allclose(residual.pessimistic_value(q, 1.0), [1.0, 2.0])
    np.testing.assert_allclose(residual.pessimistic_value(q, 0.0), [2.0, 2.0])


def test_correction_reach_counts_the_operator_steps_a_bounded_residual_cannot_express():
    base = jnp.zeros((3, 2))
    executed = jnp.array([[0.2, 0.0], [0.8, 0.0], [0.0, -0.8]])  # needs residuals 0.5, 2 and -2 at scale 0.4
    mask = jnp.array([True, True, False])
    reach = residual.correction_reach(executed, base, 0.4, mask)
    assert float(reach["share_outside"]) == pytest.approx(0.5)
    assert float(reach["lost_fraction"]) == pytest.approx(0.25)  # half of step 2's size, none of step 1's


def test_monte_carlo_returns_discount_to_the_end_of_each_episode():
    reward = np.array([[0.0, 0.0, 1.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    valid = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
    # Row 0 succeeds at step 2: 0.5^2, 0.5, 1; the invalid step after it gets 0. Row 1 fails: all 0.
    np.testing.assert_allclose(
        residual.monte_carlo_returns(reward, valid, 0.5), [[0.25, 0.5, 1.0, 0.0], [0.0] * 4]
    )


def hand_episode(key: jax.Array, length: int, success: bool, model) -> dict:
    obs = jax.device_get(model.fake_observation(key, length))
    reward = np.zeros(length, np.float32)
    reward[-1] = float(success)
    action = np.asarray(jax.random.uniform(key, (length, model.action_size), minval=-1, maxval=1))
    return {"steps": {"observation": obs, "action": action, "reward": reward}}


def test_critic_pretraining_regresses_every_member_onto_the_monte_carlo_returns():
    prior, spec, state = residual_setup(critic_lr=1e-3)
    nets = spec.nets
    model = prior.model
    episodes = [hand_episode(jax.random.key(i), 5, success=i == 0, model=model) for i in range(2)]
    keys = list(model.observation_spec(1))
    data = residual.returns_dataset(episodes, [], 0.9, keys)
    # The success episode's returns are 0.9^4 .. 1; the failure's are all 0.
    np.testing.assert_allclose(data["return"], [0.9**4, 0.9**3, 0.81, 0.9, 1.0, 0, 0, 0, 0, 0], rtol=1e-6)
    padded = residual.pad_dataset(data, 16)
    pretrain = jax.jit(
        functools.partial(residual.critic_pretrain_steps, spec=spec, num_steps=600, batch_size=16)
    )
    state, metrics = pretrain(state, padded, jax.random.key(0))
    assert float(metrics["critic_pretrain_loss_last"]) < 0.01 * float(metrics["critic_pretrain_loss_first"])
    obs = normalization.normalize(data["obs"], nets.stats)
    base = residual.base_action(nets, state.prior, obs)
    q = residual.q_values(nets, state.critic, obs, jnp.asarray(data["action"]), base)  # [E, 10]
    np.testing.assert_allclose(np.asarray(q), np.broadcast_to(data["return"], q.shape), atol=0.05)
    # TD starts from the pretrained values.
    jax.tree.map(np.testing.assert_array_equal, state.target_critic, state.critic)


def constant_critic(critic, value: float):
    """Critic params whose every member outputs `value` whatever the input (output kernel zeroed)."""
    critic = jax.tree.map(jnp.copy, critic)
    critic["q"]["out"]["kernel"] = nnx.Param(jnp.zeros_like(critic["q"]["out"]["kernel"][...]))
    critic["q"]["out"]["bias"] = nnx.Param(jnp.full_like(critic["q"]["out"]["bias"][...], value))
    return critic


def test_the_td_target_is_the_n_step_return_of_the_executed_steps_bootstrapped_at_t_plus_n():
    prior, spec, state = residual_setup(gamma=0.9, target_subset=2)
    model = prior.model
    state = state.replace(target_critic=constant_critic(state.target_critic, 2.0))
    # One episode of 6 steps that succeeds at its last step (reward 1, terminal).
    steps = 6
    obs = jax.tree.map(lambda x: x[None], model.fake_observation(jax.random.key(1), steps))
    block = {
        "obs": obs,
        "action": jnp.zeros((1, steps, model.action_size)),
        "reward": jnp.zeros((1, steps)).at[0, -1].set(1.0),
        "terminal": jnp.zeros((1, steps), bool).at[0, -1].set(True),
        "valid": jnp.ones((1, steps), bool),
        "is_first": jnp.zeros((1, steps), bool).at[0, 0].set(True),
        "intervention": jnp.zeros((1, steps), bool),
        "version": jnp.zeros((1, steps), jnp.int32),
        "reward_source": jnp.zeros((1, steps), jnp.int8),
    }
    mesh = sharding.make_mesh(jax.devices()[:1])
    obs_spec = {k: jax.ShapeDtypeStruct(v.shape[2:], v.dtype) for k, v in obs.items()}
    buffer = replay.create(obs_spec, model.action_size, 16, mesh, n_step=model.chunk)
    local = replay.shard_view(replay.insert(buffer, block, source=1), 0)
    batch = replay.gather(local, jnp.arange(steps), n_step=model.chunk, chunk=model.chunk, gamma=0.9)
    target = residual.critic_target(
        state, sac.normalize_batch(batch, spec.nets.stats), jax.random.key(0), spec=spec
    )
    # n = H = 4, gamma = 0.9, Q' = 2 everywhere:
    # t=0, 1: no reward within 4 steps, bootstrap 0.9^4 * 2 = 1.3122;
    # t=2: the success is 3 steps on: 0.9^3 = 0.729 and the terminal stops the bootstrap;
    # t=3, 4, 5: 0.9^2, 0.9, 1.
    np.testing.assert_allclose(np.asarray(target), [1.3122, 1.3122, 0.729, 0.81, 0.9, 1.0], rtol=1e-5)


def test_the_selecting_td_target_bootstraps_from_the_action_the_policy_would_run():
    prior, spec, state = residual_setup(residual_select=True, residual_select_target=True, target_subset=0)
    _, _, batches = small_setup(batch=64)
    batch = jax.tree.map(lambda x: x[0], batches)
    moved = jax.tree.map(lambda x: x + 0.3, state.actor)  # patched and prior actions differ everywhere
    state = state.replace(actor=moved)
    key = jax.random.key(3)
    got = np.asarray(residual.critic_target(state, batch, key, spec=spec))
    # By hand: the patched action the target samples (the same key split), both actions' values under
    # the target critic, each sample's choice by the pessimistic value, then the n-step target (min over
    # all members: target_subset 0).
    nets, obs = spec.nets, batch["next_obs"]
    base = residual.base_action(nets, state.prior, obs)
    residual_action, _, _ = residual.residual_sample(nets, moved, obs, base, jax.random.split(key)[0])
    patched = residual.compose(base, residual_action, nets.scale)
    q_patched = np.asarray(residual.q_values(nets, state.target_critic, obs, patched, base))
    q_base = np.asarray(residual.q_values(nets, state.target_critic, obs, base, base))
    lower = lambda q: q.mean(axis=0) - q.std(axis=0)  # noqa: E731
    prefer = lower(q_patched) > lower(q_base)
    assert 0 < prefer.sum() < len(prefer)  # the random critic takes both branches
    bootstrap = np.where(prefer, q_patched.min(axis=0), q_base.min(axis=0))
    want = np.asarray(batch["reward"]) + np.asarray(batch["discount"]) * bootstrap
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Without selection in the target it bootstraps from the patched action alone.
    plain = dataclasses.replace(spec, nets=dataclasses.replace(nets, select_target=False))
    np.testing.assert_allclose(
        np.asarray(residual.critic_target(state, batch, key, spec=plain)),
        np.asarray(batch["reward"]) + np.asarray(batch["discount"]) * q_patched.min(axis=0),
        rtol=1e-5,
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="needs sac.residual_select"):
        residual_setup(residual_select=False, residual_select_target=True)


def test_the_residual_actor_is_held_during_warmup_and_its_average_moves_by_polyak():
    prior, spec, state = residual_setup(
        pessimism=1.0, residual_bc_weight=1.0, bc_sources=("patch",), actor_polyak=0.5
    )
    _, _, batches = small_setup()
    batch = jax.tree.map(lambda x: x[0], batches)
    actor_update = jax.jit(functools.partial(residual.actor_update, spec=spec))
    held, _ = actor_update(state, batch, jax.random.key(0), enabled=jnp.bool_(False))
    for name in ("actor", "actor_average", "log_alpha"):
        jax.tree.map(np.testing.assert_array_equal, getattr(held, name), getattr(state, name))
    moved, metrics = actor_update(state, batch, jax.random.key(0), enabled=jnp.bool_(True))
    head = lambda params: np.asarray(params["head"]["kernel"][...])  # noqa: E731
    action_size = prior.model.action_size
    assert np.abs(head(moved.actor)[:, :action_size]).max() > 0
    # The exploration std stays at its initial value: its half of the zero head gets no gradient.
    np.testing.assert_array_equal(head(moved.actor)[:, action_size:], 0.0)
    np.testing.assert_allclose(
        head(moved.actor_average), 0.5 * head(state.actor_average) + 0.5 * head(moved.actor)
    )
    assert float(metrics["bc"]) > 0
    offline_only = {**batch, "source": jnp.zeros_like(batch["source"])}
    _, metrics = actor_update(state, offline_only, jax.random.key(0), enabled=jnp.bool_(True))
    assert float(metrics["bc"]) == 0.0


def test_the_fused_residual_update_runs_the_critic_and_actor_steps():
    prior, spec, state = residual_setup()
    _, _, batches = small_setup()
    update = jax.jit(residual.update, static_argnames="spec")  # the spec is hashable: a static argument
    new, metrics = update(state, batches, jax.random.key(0), spec=spec)
    assert int(new.step) == spec.config.utd
    assert all(np.isfinite(float(v)) for v in metrics.values())
    jax.tree.map(np.testing.assert_array_equal, new.prior, state.prior)  # the prior stays frozen
