"""Behaviour cloning: the loss by hand, chunk targets, sharding, checkpoints and exact resume."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import configs
from jaxvla import normalization
from learner import bc
from learner import dataset
from learner import pretrain
from learner import sharding
from learner.checkpoints import Checkpoints


def fake_episodes(count: int, steps: int, seed: int = 0) -> list[dict]:
    """Random episodes with the workcell's observation shapes (enough to exercise the loop)."""
    rng = np.random.default_rng(seed)
    spec = configs.get_config("debug").model.observation_spec(steps)

    def episode():
        obs = {k: rng.normal(size=s.shape).astype(np.float32) for k, s in spec.items() if k != "prompt"}
        obs["prompt"] = np.tile(np.arange(4, 10, dtype=np.int32).tolist() + [0] * 6, (steps, 1)).astype(
            np.int32
        )
        return {
            "steps": {"observation": obs, "action": np.tanh(rng.normal(size=(steps, 4))).astype(np.float32)}
        }

    return [episode() for _ in range(count)]


def test_chunk_loss_by_hand():
    # H=2, A=1, the second chunk step masked. Step 0: tanh(0) = 0 vs 0.5 -> squared error 0.25.
    # NLL at u = atanh(0.5) = 0.549306 under N(0, 1): 0.5 u^2 + 0.918939 = 1.069808, minus the squash
    # term -log(1 - 0.5^2) = 0.287682 -> 0.782126. Loss = 0.25 + 0.1 * 0.782126 = 0.3282126.
    mean = jnp.asarray([[[0.0], [math.atanh(0.5)]]])
    loss, metrics = bc.chunk_loss(
        mean, jnp.zeros_like(mean), jnp.full((1, 2, 1), 0.5), jnp.asarray([[1, 0]]), 0.1
    )
    np.testing.assert_allclose(metrics["mse"], 0.25, rtol=1e-6)
    np.testing.assert_allclose(metrics["nll"], 0.782126, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.3282126, rtol=1e-5)


def test_action_chunks_stop_at_the_episode_end():
    actions = np.arange(3, dtype=np.float32)[:, None]  # a0=0, a1=1, a2=2
    chunks, mask = dataset.action_chunks(actions, 2)
    np.testing.assert_array_equal(chunks[..., 0], [[0, 1], [1, 2], [2, 2]])
    np.testing.assert_array_equal(mask, [[True, True], [True, True], [True, False]])


@pytest.mark.parametrize("offline, operator", [(6, 3), (6, 0), (0, 3)])
def test_the_focused_sampler_draws_its_share_from_the_operator_rows(offline, operator):
    # Rows 0..5 offline, then the operator's, then zero padding that must never be drawn. With rows of
    # one kind only, every draw is uniform over those rows.
    rows = offline + operator
    padded = dataset.pad(
        {"obs": {}, "chunk": np.arange(1, rows + 1, dtype=np.float32), "mask": np.ones(rows, bool)}, 16
    )
    padded["focus"] = np.int32(offline)
    sample = jax.jit(bc.focused_sampler(0.25), static_argnums=2)
    drawn = np.asarray(sample(jax.tree.map(jnp.asarray, padded), jax.random.key(0), 256)["chunk"]) - 1
    assert drawn.min() >= 0 and drawn.max() < rows  # no padding
    if offline and operator:
        assert np.all(drawn[:192] < offline) and np.all(drawn[192:] >= offline)  # 64 of 256: the operator's
    assert len(np.unique(drawn)) == rows  # every row is drawn (64 draws of 3 rows miss one w.p. < 1e-10)
    with pytest.raises(ValueError, match="share"):
        bc.focused_sampler(1.0)


def _block(config, data, stats, mesh):
    graphdef, params = nnx.split(config.model.create_policy(0), nnx.Param)
    optimizer = bc.make_optimizer(1e-3, 10, 1, 0.0)
    train = bc.make_train_steps(
        graphdef, stats, optimizer, num_steps=3, batch_size=8, nll_weight=0.01, mesh=mesh
    )
    state = jax.device_put(bc.init_state(params, optimizer), sharding.replicated(mesh))
    return train(state, jax.device_put(data, sharding.replicated(mesh)), jax.random.key(0))


def test_sharded_training_matches_one_device():
    config = configs.get_config("debug")
    data = dataset.flatten(fake_episodes(3, 20), config.model.chunk)
    stats = normalization.compute(data["obs"])
    assert len(jax.devices()) == 4
    state4, metrics4 = _block(config, data, stats, sharding.make_mesh())
    state1, metrics1 = _block(config, data, stats, sharding.make_mesh(jax.devices()[:1]))
    assert int(state4.step) == int(state1.step) == 3
    np.testing.assert_allclose(metrics4["loss"], metrics1["loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), state4.params, state1.params
    )


def test_batch_size_must_split_across_devices():
    with pytest.raises(ValueError, match="divisible"):
        sharding.check_batch_size(6, sharding.make_mesh())


def _config(steps: int):
    base = configs.get_config("debug")
    pc = dataclasses.replace(
        base.pretrain, steps=steps, log_every=1, checkpoint_every=1, eval_every=0, batch_size=8
    )
    return dataclasses.replace(base, pretrain=pc)


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def test_resume_gives_the_same_next_step(tmp_path):
    episodes = fake_episodes(3, 20)
    pretrain.train(_config(2), episodes, tmp_path / "resumed", progress=False)
    # A second run with more steps finds the step-2 checkpoint and continues from it.
    resumed = pretrain.train(_config(3), episodes, tmp_path / "resumed", progress=False)
    straight = pretrain.train(_config(3), episodes, tmp_path / "straight", progress=False)
    assert resumed.step == straight.step == 3
    assert _losses(tmp_path / "resumed")[3] == _losses(tmp_path / "straight")[3]
    jax.tree.map(np.testing.assert_array_equal, resumed.params, straight.params)
    loaded = pretrain.load(tmp_path / "resumed")
    assert loaded.step == 3 and loaded.model == _config(3).model
    assert loaded.config_hash == resumed.config_hash == pretrain.config_hash(dataclasses.asdict(_config(3)))
    jax.tree.map(np.testing.assert_array_equal, loaded.params, straight.params)
    for key in loaded.stats:
        np.testing.assert_array_equal(loaded.stats[key]["mean"], straight.stats[key]["mean"])


def test_a_prior_saved_under_an_older_config_still_loads(tmp_path):
    """Only the model is rebuilt from a checkpoint, so one written before the `target` section and the
    `patch_size` name (its config held `patch.prior`, its model `patch`) loads, hashed as stored."""
    model = configs.get_config("debug").model
    graphdef, params = nnx.split(model.create_policy(0), nnx.Param)
    state = bc.init_state(params, bc.make_optimizer(1.0, 1, 0, 0.0))
    old_model = model.to_dict()
    old_model["patch"] = old_model.pop("patch_size")
    old_config = {"name": "debug", "patch": {"prior": "runs/default"}, "model": old_model}
    stats = normalization.compute(jax.device_get(model.fake_observation(jax.random.key(0), 8)))
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    meta = {"config": old_config, "model": old_model, "stats": normalization.to_lists(stats)}
    checkpoints.save(7, state, meta)
    checkpoints.close()
    prior = pretrain.load(tmp_path)
    assert prior.model == model
    assert prior.config_hash == pretrain.config_hash(old_config)
    jax.tree.map(np.testing.assert_array_equal, prior.params, params)
