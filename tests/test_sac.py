"""SAC over action chunks: losses against hand-computed values, and the update across meshes and processes."""

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
from learner import replay
from learner import sac
from learner import sharding

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
    """The debug model, a fresh SAC state and `utd + 1` random normalised batches."""
    config = configs.get_config("debug")
    mc = config.model
    sc = configs.SACConfig(batch_size=batch, utd=utd, critic_warmup=0, **sac_overrides)
    graphdef, actor = nnx.split(mc.create_policy(0), nnx.Param)
    critic_graphdef, critic = nnx.split(mc.create_critic(1), nnx.Param)
    optimizers = sac.make_optimizers(sc)
    state = sac.init_state(actor, critic, sc.init_alpha, actor_opt=optimizers["actor"],
                           critic_opt=optimizers["critic"], alpha_opt=optimizers["alpha"])  # fmt: skip
    keys = jax.random.split(jax.random.key(2), 6)
    n = (utd + 1) * batch
    obs = mc.fake_observation(keys[0], n)
    stats = normalization.compute(jax.device_get(obs))
    nets = sac.Networks(actor=graphdef, critic=critic_graphdef, stats=stats)
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
    return sc, mc, nets, optimizers, state, batches


def test_critic_regresses_onto_a_fixed_target():
    sc, mc, nets, optimizers, state, batches = small_setup()
    batch = jax.tree.map(lambda x: x[0], batches)
    batch = {
        **batch,
        "reward": jnp.full_like(batch["reward"], 0.7),
        "discount": jnp.zeros_like(batch["discount"]),
    }
    step = jax.jit(lambda s, k: sac.critic_update(s, batch, k, nets=nets, optimizer=optimizers["critic"],
                                                  target_subset=0, tau=sc.tau))  # fmt: skip
    first = None
    for i in range(300):
        state, metrics = step(state, jax.random.key(i))
        first = first if first is not None else float(metrics["critic_loss"])
    assert float(metrics["critic_loss"]) < 0.01 < first
    np.testing.assert_allclose(float(metrics["q"]), 0.7, atol=0.05)


def test_actor_update_is_held_during_warmup_and_bc_only_sees_the_bc_sources():
    sc, mc, nets, optimizers, state, batches = small_setup()
    batch = jax.tree.map(lambda x: x[0], batches)
    kwargs = dict(nets=nets, actor_optimizer=optimizers["actor"], alpha_optimizer=optimizers["alpha"],
                  target_entropy=-8.0, bc_weight=1.0, bc_sources=(replay.SOURCES.index("patch"),),
                  nll_weight=0.01)  # fmt: skip
    actor_update = jax.jit(functools.partial(sac.actor_update, **kwargs))  # compiled once, called thrice
    held, _ = actor_update(state, batch, jax.random.key(0), enabled=jnp.bool_(False))
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), held.actor, state.actor)
    assert all(jax.tree.leaves(chex_equal))
    moved, metrics = actor_update(state, batch, jax.random.key(0), enabled=jnp.bool_(True))
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), moved.actor,
                                                state.actor)))  # fmt: skip
    assert float(metrics["bc"]) > 0
    offline_only = {**batch, "source": jnp.zeros_like(batch["source"])}
    _, metrics = actor_update(state, offline_only, jax.random.key(0), enabled=jnp.bool_(True))
    assert float(metrics["bc"]) == 0.0


def assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_update_on_four_devices_equals_the_single_device_update():
    assert jax.device_count() >= 4
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:4]):
        sc, mc, nets, optimizers, state, batches = small_setup(batch=16)
        mesh = sharding.make_mesh(devices)
        update = sac.make_update(sc, mc, nets, optimizers, mesh)
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
        name: replay.insert(replay.create(spec, mc.action_size, 64, mesh), block, source=i, n_step=mc.chunk)
        for i, name in enumerate(replay.SOURCES)
    }
    draw = jax.jit(functools.partial(sac.draw_batches, config=sc, chunk=mc.chunk, stats=stats,
                                     batch_sharding=sharding.batch_sharded(mesh)))  # fmt: skip
    key = jax.random.key(3)
    got = draw(buffers, key)
    assert jax.tree.leaves(got)[0].shape[:2] == (sc.utd + 1, sc.batch_size)
    alone = jax.jit(lambda buffers, key: sac.normalize_batch(replay.sample_mixed(
        buffers, sac.mix_ratios(sc), key, sc.batch_size, n_step=mc.chunk, chunk=mc.chunk, gamma=sc.gamma,
    ), stats))  # fmt: skip
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
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(HERE.parent)}  # fmt: skip
    worker = HERE / "sac_distributed_worker.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
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

    sc, mc, nets, optimizers, state, batches = small_setup(batch=16)
    update = sac.make_update(sc, mc, nets, optimizers, sharding.make_mesh(jax.devices()[:1]))
    new, _ = update(state, batches, jax.random.key(3))
    want = jax.tree.leaves(jax.device_get((new.actor, new.critic, new.log_alpha)))
    assert len(want) == int(got["leaves"])
    for i, leaf in enumerate(want):
        np.testing.assert_allclose(got[f"leaf{i}"], np.asarray(leaf), rtol=2e-5, atol=1e-6)
    assert not math.isnan(float(got["critic_loss"]))
