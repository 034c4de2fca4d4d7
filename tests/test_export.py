"""The export file written by the learner: manifest content, round trips, atomic and immutable versions."""

import datetime
import os

import jax
import numpy as np
import pytest
from flax import nnx

from jaxvla import export
from jaxvla import normalization
from jaxvla.actor import fileformat
from jaxvla.models import ModelConfig

CONFIG = ModelConfig(width=16, prompt_dim=8, depth=1, chunk=3, advantage_conditioned=True)


def params_and_stats(config: ModelConfig = CONFIG, seed: int = 0):
    params = nnx.state(config.create_policy(seed), nnx.Param)
    observations = jax.device_get(config.fake_observation(jax.random.key(seed), 64))
    return params, normalization.compute(observations)


def test_manifest_records_everything_the_robot_needs(tmp_path):
    params, stats = params_and_stats()
    path = export.write(
        tmp_path,
        CONFIG,
        params,
        stats,
        version=12,
        parent_version=11,
        config_hash="abc123",
        extra={"step": np.int64(5000), "loss": jax.numpy.float32(0.5)},
    )
    assert path == tmp_path / "policy-v000012.msgpack"
    manifest, arrays = fileformat.read(path)
    assert manifest["format"] == "jaxvla-policy" and manifest["format_version"] == 1
    assert (manifest["version"], manifest["parent_version"]) == (12, 11)
    assert manifest["config_hash"] == "abc123" and manifest["extra"] == {"step": 5000, "loss": 0.5}
    assert datetime.datetime.fromisoformat(manifest["created"]).tzinfo is not None
    assert ModelConfig.from_dict(manifest["model"]) == CONFIG
    assert manifest["action"] == {
        "size": 4,
        "chunk": 3,
        "low": -1.0,
        "high": 1.0,
        "names": ["dx", "dy", "dz", "suction"],
    }
    assert manifest["observation"]["prompt"] == {"shape": [12], "dtype": "int32"}
    assert manifest["observation"]["scene"] == {"shape": [10], "dtype": "float32"}
    restored = normalization.from_lists(manifest["normalization"])
    assert restored.keys() == stats.keys()
    for key in stats:  # float32 -> JSON -> float32 is exact
        np.testing.assert_array_equal(restored[key]["mean"], stats[key]["mean"])
        np.testing.assert_array_equal(restored[key]["std"], stats[key]["std"])
    expected = export.flat_arrays(params)
    assert "encoder/state/linears/0/kernel" in arrays and arrays.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_array_equal(arrays[name], array)
    packed = {name: fileformat.pack_array(a) for name, a in expected.items()}
    assert manifest["sha256"] == fileformat.arrays_sha256(packed)
    assert export.read_manifest(path) == manifest


def test_explicit_file_name_and_no_parent(tmp_path):
    params, stats = params_and_stats()
    target = tmp_path / "sub" / "first.msgpack"
    path = export.write(target, CONFIG, params, stats, version=0, parent_version=None, config_hash="h")
    assert path == target and export.read_manifest(path)["parent_version"] is None


def test_a_failed_write_leaves_nothing_behind(tmp_path, monkeypatch):
    params, stats = params_and_stats()

    def crash(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        export.write(tmp_path, CONFIG, params, stats, version=3, parent_version=None, config_hash="h")
    assert list(tmp_path.iterdir()) == []


def test_a_version_is_written_once(tmp_path):
    params, stats = params_and_stats()
    first = export.write(tmp_path, CONFIG, params, stats, version=3, parent_version=None, config_hash="h")
    data = first.read_bytes()
    again = export.write(tmp_path, CONFIG, params, stats, version=3, parent_version=None, config_hash="h")
    assert again == first and first.read_bytes() == data  # same weights: a no-op (a resumed learner)
    other, other_stats = params_and_stats(seed=1)
    with pytest.raises(FileExistsError, match="version 3"):
        export.write(tmp_path, CONFIG, other, stats, version=3, parent_version=None, config_hash="h")
    with pytest.raises(FileExistsError, match="version 3"):  # same weights, other normalisation
        export.write(tmp_path, CONFIG, params, other_stats, version=3, parent_version=None, config_hash="h")
    assert first.read_bytes() == data


def test_params_of_another_network_are_refused(tmp_path):
    _, stats = params_and_stats()
    critic = nnx.state(CONFIG.create_critic(0), nnx.Param)
    with pytest.raises(ValueError, match="do not match"):
        export.write(tmp_path, CONFIG, critic, stats, version=1, parent_version=None, config_hash="h")
    wider = nnx.state(ModelConfig(width=32, prompt_dim=8, depth=1, chunk=3).create_policy(0), nnx.Param)
    with pytest.raises(ValueError, match="wrong shape"):
        export.write(tmp_path, CONFIG, wider, stats, version=1, parent_version=None, config_hash="h")


@pytest.mark.parametrize(
    ("version", "parent", "match"),
    [(-1, None, "non-negative"), (3, 3, "parent_version"), (3, 5, "parent_version"), (1.5, None, "integers")],
)
def test_bad_versions_are_refused(tmp_path, version, parent, match):
    params, stats = params_and_stats()
    with pytest.raises(ValueError, match=match):
        export.write(tmp_path, CONFIG, params, stats, version=version, parent_version=parent, config_hash="h")


def test_stats_must_cover_the_inputs_and_be_finite(tmp_path):
    params, stats = params_and_stats()
    partial = {k: v for k, v in stats.items() if k != "item"}
    with pytest.raises(ValueError, match="item"):
        export.write(tmp_path, CONFIG, params, partial, version=1, parent_version=None, config_hash="h")
    nan = {**stats, "item": {"mean": np.full(6, np.nan, np.float32), "std": stats["item"]["std"]}}
    with pytest.raises(ValueError, match="NaN|not JSON compliant"):
        export.write(tmp_path, CONFIG, params, nan, version=1, parent_version=None, config_hash="h")
    assert list(tmp_path.iterdir()) == []
