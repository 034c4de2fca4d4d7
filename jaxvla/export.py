"""Export a trained policy for the robot: one checksummed file per params version.

`write` flattens the Policy's `nnx.Param` state to "/"-joined names, builds the manifest (model spec,
observation and action spec, normalisation statistics, versions, config hash) and writes the file
atomically. The container and its checksums are defined in `jaxvla/actor/fileformat.py`, shared with
the numpy client that reads it (`jaxvla.actor.load`).

Manifest fields (JSON): format, format_version, version, parent_version, config_hash, created (UTC,
ISO 8601), jaxvla_version, model (`ModelConfig.to_dict()`), observation ({key: {shape, dtype}} of one
observation, what the network reads), action ({size, chunk, low, high, names}), normalization
(`jaxvla.normalization.to_lists` of the stats), sha256 (of the arrays), extra (caller's, JSON).
"""

import datetime
import operator
import os
import pathlib

import jax
import numpy as np
from flax import nnx

import jaxvla
from jaxvla import normalization
from jaxvla.actor import fileformat
from jaxvla.actor.fileformat import read_manifest
from jaxvla.models.config import ModelConfig

__all__ = ["ACTION_NAMES", "filename", "flat_arrays", "read_manifest", "write", "write_pro"]

ACTION_NAMES = ("dx", "dy", "dz", "suction")  # the workcell's action, see envs.cell.apply_action
SUFFIX = ".msgpack"
# What makes two exports of a version the same policy (besides the weights' sha256).
IDENTITY = ("model", "normalization", "parent_version", "config_hash")


def filename(version: int) -> str:
    """`policy-v000012.msgpack`: zero-padded so that names sort by version."""
    return f"policy-v{version:06d}{SUFFIX}"


def flat_arrays(params: nnx.State | dict) -> dict[str, np.ndarray]:
    """{"encoder/state/linears/0/kernel": array, ...} from an nnx.State or its pure dict."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return {"/".join(map(str, path)): np.asarray(jax.device_get(leaf)) for path, leaf in _flat_leaves(params)}


def write(
    path: str | os.PathLike,
    model_config: ModelConfig,
    params: nnx.State,
    stats: dict,
    *,
    version: int,
    parent_version: int | None,
    config_hash: str,
    extra: dict | None = None,
    action_names: tuple[str, ...] = ACTION_NAMES,
) -> pathlib.Path:
    """Writes `params` (the Policy's nnx.Param state) as version `version`; returns the file's path.

    `path` is a directory (the file is named by `filename(version)`) or a file ending in ".msgpack".
    The write is atomic (temporary file, fsync, rename). Writing a version that already exists returns
    the existing file if it holds the same policy (weights, spec, stats, parent, config hash: an
    idempotent re-export after a resume) and raises FileExistsError otherwise: a version names one
    policy for the whole fleet.
    """
    version, parent_version = _check_versions(version, parent_version)
    path = pathlib.Path(path)
    target = path if path.suffix == SUFFIX else path / filename(version)
    if len(action_names) != model_config.action_size:
        raise ValueError(f"{len(action_names)} action names for action_size {model_config.action_size}")
    arrays = flat_arrays(params)
    _check_params(model_config, arrays)
    spec = model_config.observation_spec(1)
    manifest = {
        "format": fileformat.FORMAT,
        "format_version": fileformat.FORMAT_VERSION,
        "version": version,
        "parent_version": parent_version,
        "config_hash": config_hash,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jaxvla_version": jaxvla.__version__,
        "model": model_config.to_dict(),
        "observation": {k: {"shape": list(s.shape[1:]), "dtype": s.dtype.name} for k, s in spec.items()},
        "action": {
            "size": model_config.action_size,
            "chunk": model_config.chunk,
            "low": -1.0,
            "high": 1.0,
            "names": list(action_names),
        },
        "normalization": _stats_lists(stats, spec),
        "extra": extra or {},
    }
    if target.exists():
        existing = fileformat.read_manifest(target)
        ours = fileformat.arrays_sha256({name: fileformat.pack_array(a) for name, a in arrays.items()})
        same = existing["sha256"] == ours and all(existing[k] == manifest[k] for k in IDENTITY)
        if not same:
            raise FileExistsError(f"{target} holds another policy as version {version}; versions are final")
        return target
    fileformat.write_atomic(target, fileformat.pack(manifest, arrays))
    return target


def write_pro(path: str | os.PathLike, net, params: nnx.State, stats: dict, *, version: int) -> pathlib.Path:
    """Writes a process-reward model (`jaxvla.models.pro`) in the same checksummed container, with
    `"kind": "pro"` and its network spec under "pro"; `jaxvla.actor.pro.load` reads it."""
    spec = ModelConfig(image=net.image).observation_spec(1)
    manifest = {
        "format": fileformat.FORMAT,
        "format_version": fileformat.FORMAT_VERSION,
        "kind": "pro",
        "version": int(version),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "jaxvla_version": jaxvla.__version__,
        "pro": net.to_dict(),
        "observation": {k: {"shape": list(s.shape[1:]), "dtype": s.dtype.name} for k, s in spec.items()},
        "normalization": _stats_lists(stats, spec),
    }
    target = pathlib.Path(path)
    fileformat.write_atomic(target, fileformat.pack(manifest, flat_arrays(params)))
    return target


def _check_versions(version: int, parent_version: int | None) -> tuple[int, int | None]:
    """Plain ints (numpy and jax step counters accepted); the parent must be an earlier version."""
    try:
        version = operator.index(version)
        parent_version = None if parent_version is None else operator.index(parent_version)
    except TypeError as err:
        raise ValueError(f"versions must be integers: {err}") from err
    if version < 0:
        raise ValueError(f"version must be non-negative, got {version}")
    if parent_version is not None and not 0 <= parent_version < version:
        raise ValueError(f"parent_version must be None or in [0, {version}), got {parent_version}")
    return version, parent_version


def _check_params(model_config: ModelConfig, arrays: dict[str, np.ndarray]) -> None:
    """The params must be exactly the Policy that `model_config` builds (not a critic, not another size)."""
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: model_config.create_policy(0)), nnx.Param))
    expected = {"/".join(map(str, path)): tuple(leaf.shape) for path, leaf in _flat_leaves(abstract)}
    got = {name: a.shape for name, a in arrays.items()}
    if expected != got:
        missing, unexpected = sorted(expected.keys() - got), sorted(got.keys() - expected)
        wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
        raise ValueError(
            f"params do not match the model config's Policy: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shape {[(k, got[k], expected[k]) for k in wrong[:5]]}"
        )
    bad = sorted(name for name, a in arrays.items() if a.dtype != np.float32)
    if bad:
        raise ValueError(f"params must be float32; {bad[:5]} are not")


def _flat_leaves(node: dict, path: tuple = ()):
    """(path, leaf) pairs of a nested dict, depth first."""
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _flat_leaves(child, (*path, key))
    else:
        yield path, node


def _stats_lists(stats: dict, spec: dict) -> dict:
    """The manifest's copy of the stats, which must cover every float input the network reads."""
    missing = sorted(k for k in spec if k != "prompt" and k not in stats)
    if missing:
        raise ValueError(f"no normalisation statistics for {missing}; the robot would run unnormalised")
    for key, s in stats.items():
        if key not in spec:
            continue  # e.g. image stats from camera data, for a model without a camera: kept, unused
        size = spec[key].shape[-1]
        if np.shape(s["mean"]) != (size,) or np.shape(s["std"]) != (size,):
            raise ValueError(f"stats for {key!r} must have shape ({size},), got {np.shape(s['mean'])}")
    return normalization.to_lists(stats)
