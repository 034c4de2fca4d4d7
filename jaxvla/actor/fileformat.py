"""The exported policy file: arrays plus a JSON manifest in one msgpack map, checksummed. No pickle.

Layout (format version 1), one msgpack map:

    {"manifest": <JSON text>,
     "manifest_sha256": <hex sha256 of the manifest's UTF-8 bytes>,
     "arrays": {<flat name>: {"dtype": "<f4", "shape": [..], "data": <bytes>}}}

Flat names are NNX state paths joined with "/" (`encoder/state/linears/0/kernel`). `dtype` is numpy's
little-endian type string and `data` the array's C-order bytes. The manifest's "sha256" is
`arrays_sha256`: for each array in sorted-name order (Python string order), the UTF-8 bytes of
`f"{name}\\0{dtype}\\0{d0},{d1},...\\0"` followed by `data`. It names the weights alone, so two exports of
the same params agree; `manifest_sha256` covers everything else (stats, spec, versions).

The learner writes files with `jaxvla.export.write`, which uses `pack` from here, so the writer and this
reader cannot disagree on the format. Standard library, numpy and msgpack only.
"""

import hashlib
import json
import os
import pathlib
import tempfile

import msgpack
import numpy as np

FORMAT = "jaxvla-policy"
FORMAT_VERSION = 1
# dtypes a file may hold; the forward pass computes in float32.
DTYPES = ("<f4", "<i4")


class PolicyFileError(ValueError):
    """The file is not a policy this client can run: corrupt, truncated, foreign or from a newer format."""


def arrays_sha256(arrays: dict[str, dict]) -> str:
    """Hex sha256 over packed arrays ({name: {"dtype", "shape", "data"}}); see the module docstring."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        entry = arrays[name]
        shape = ",".join(str(int(d)) for d in entry["shape"])
        digest.update(f"{name}\0{entry['dtype']}\0{shape}\0".encode())
        digest.update(entry["data"])
    return digest.hexdigest()


def pack_array(array: np.ndarray) -> dict:
    """{"dtype", "shape", "data"} of a float32 or int32 array, little-endian, C order."""
    array = np.asarray(array)
    kind = {"f": "<f4", "i": "<i4"}.get(array.dtype.kind)
    if kind is None or array.dtype.itemsize != 4:
        raise ValueError(f"arrays must be float32 or int32, got {array.dtype}")
    data = np.ascontiguousarray(array, dtype=kind).tobytes()
    return {"dtype": kind, "shape": list(array.shape), "data": data}


def pack(manifest: dict, arrays: dict[str, np.ndarray]) -> bytes:
    """The file's bytes. Sets manifest["sha256"]; the manifest must be JSON-serialisable (no NaN; numpy
    and jax values become numbers and lists)."""
    packed = {name: pack_array(a) for name, a in arrays.items()}
    manifest = {**manifest, "sha256": arrays_sha256(packed)}
    text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False, default=_plain)
    return msgpack.packb(
        {"manifest": text, "manifest_sha256": _sha256(text.encode()), "arrays": packed}, use_bin_type=True
    )


def unpack(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """(manifest, {name: array}) after checking the format, its version and both checksums.

    Raises PolicyFileError on anything else: a truncated or corrupt file, another format, a newer one.
    Arrays are read-only views of `data`.
    """
    try:
        container = msgpack.unpackb(data, raw=False)
    except Exception as err:  # msgpack raises several types (ValueError, ExtraData, FormatError, ...)
        raise PolicyFileError(f"not a readable policy file (truncated or corrupt): {err}") from err
    if not isinstance(container, dict) or not isinstance(container.get("manifest"), str):
        raise PolicyFileError("not a jaxvla policy file: no manifest")
    text = container["manifest"]
    if container.get("manifest_sha256") != _sha256(text.encode()):
        raise PolicyFileError("manifest checksum mismatch: the file is corrupt")
    try:
        manifest = json.loads(text)
    except ValueError as err:
        raise PolicyFileError(f"manifest is not JSON: {err}") from err
    _check_format(manifest)
    packed = container.get("arrays")
    if not isinstance(packed, dict):
        raise PolicyFileError("policy file has no arrays")
    try:
        digest = arrays_sha256(packed)
    except (KeyError, TypeError, ValueError) as err:
        raise PolicyFileError(f"malformed array entry: {err!r}") from err
    if digest != manifest.get("sha256"):
        raise PolicyFileError(
            f"array checksum mismatch: the file is corrupt (sha256 {digest}, manifest says "
            f"{manifest.get('sha256')})"
        )
    return manifest, {name: _unpack_array(name, entry) for name, entry in packed.items()}


def write_atomic(target: str | os.PathLike, data: bytes) -> None:
    """Writes `data` to `target` so that readers see the old file or the whole new one, even across a crash
    or power loss: temporary file in the same folder, fsync, rename, fsync of the folder."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(target.parent)


def fsync_folder(folder: str | os.PathLike) -> None:
    """Makes renames and deletions inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """`unpack` of a file."""
    with open(path, "rb") as f:
        return unpack(f.read())


def read_manifest(path: str | os.PathLike) -> dict:
    """A file's manifest, after the same checks as `read`."""
    return read(path)[0]


def _check_format(manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PolicyFileError(f"not a jaxvla policy file (format {found!r}, expected {FORMAT!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PolicyFileError(
            f"policy file has format version {version!r}; this client reads version {FORMAT_VERSION} "
            "(a newer file needs a newer jaxvla)"
        )


def _unpack_array(name: str, entry: dict) -> np.ndarray:
    dtype, shape, data = entry["dtype"], tuple(entry["shape"]), entry["data"]
    if dtype not in DTYPES:
        raise PolicyFileError(f"array {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(data, bytes) or len(data) != 4 * int(np.prod(shape, dtype=np.int64)):
        raise PolicyFileError(f"array {name!r}: data does not match shape {shape}")
    return np.frombuffer(data, dtype).reshape(shape)


def _plain(value):
    """numpy and jax scalars and arrays (a training step, a metric in `extra`) as JSON numbers and lists."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in the manifest is not JSON-serialisable")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
