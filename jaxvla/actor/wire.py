"""msgpack with numpy arrays: the fleet protocol's body encoding, shared by the robot client and the service.

An array travels as a map `{"__ndarray__": True, "data": <bytes>, "dtype": "<f4", "shape": [..]}` and a
numpy scalar as `{"__npgeneric__": True, "data": <value>, "dtype": "<i4"}`: the encoding of openpi's
`msgpack_numpy`, so an openpi client can talk to the policy-serving websocket unchanged. Never pickle.

Decoding is strict because its input comes off the network: only plain numeric and boolean dtypes,
shapes of non-negative ints, and data whose length matches dtype x shape. Anything else raises
`WireError` naming what is wrong, never a crash deeper in numpy. Standard library, numpy and msgpack only.
"""

import math

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
# dtype kinds an array may have on the wire: bool, signed and unsigned ints, floats.
ALLOWED_KINDS = "biuf"
MAX_DIMS = 8


class WireError(ValueError):
    """A body that does not decode into the arrays and values it claims to hold."""


def _encode(obj):
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise TypeError(f"arrays of dtype {obj.dtype} cannot be sent; use bool, int or float arrays")
        # tobytes() is C order whatever the layout; np.ascontiguousarray would turn a 0-d array into
        # shape [1], and a stored scalar must come back a scalar.
        return {
            b"__ndarray__": True,
            b"data": obj.tobytes(),
            b"dtype": obj.dtype.str,
            b"shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        if obj.dtype.kind not in ALLOWED_KINDS:
            raise TypeError(f"numpy scalars of dtype {obj.dtype} cannot be sent")
        return {b"__npgeneric__": True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise TypeError(f"{type(obj).__name__} cannot be sent in a fleet message")


def _dtype(text) -> np.dtype:
    if not isinstance(text, str):
        raise WireError(f"array dtype must be a string like '<f4', got {text!r}")
    try:
        dtype = np.dtype(text)
    except TypeError as err:
        raise WireError(f"unknown array dtype {text!r}") from err
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        raise WireError(f"array dtype {text!r} is not allowed; send bool, int or float arrays")
    return dtype


def _shape(value) -> tuple[int, ...]:
    ok = isinstance(value, list | tuple) and len(value) <= MAX_DIMS
    ok = ok and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in value)
    if not ok:
        raise WireError(f"array shape must be a list of at most {MAX_DIMS} non-negative ints, got {value!r}")
    return tuple(value)


def _decode(obj: dict):
    keys = {k.decode() if isinstance(k, bytes) else k for k in obj}
    get = lambda name: obj.get(name.encode(), obj.get(name))  # noqa: E731  (bin keys from openpi, str ours)
    if "__ndarray__" in keys:
        dtype, shape, data = _dtype(get("dtype")), _shape(get("shape")), get("data")
        expected = dtype.itemsize * math.prod(shape)
        if not isinstance(data, bytes) or len(data) != expected:
            size = len(data) if isinstance(data, bytes) else type(data).__name__
            raise WireError(
                f"array data is {size} bytes; dtype {dtype.str} and shape {list(shape)} need {expected}"
            )
        return np.frombuffer(data, dtype).reshape(shape)
    if "__npgeneric__" in keys:
        dtype, data = _dtype(get("dtype")), get("data")
        if not isinstance(data, bool | int | float):
            raise WireError(f"numpy scalar data must be a number, got {type(data).__name__}")
        try:
            return dtype.type(data)
        except (OverflowError, ValueError) as err:
            raise WireError(f"numpy scalar {data!r} does not fit {dtype.str}") from err
    return obj


def packb(obj) -> bytes:
    """msgpack bytes of nested dicts, lists, str, numbers, bytes and numpy arrays / scalars."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes, *, max_bytes: int | None = None):
    """The object `packb` encoded, arrays read-only views of `data`; WireError for anything malformed."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"body is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False)
    except WireError:
        raise
    except Exception as err:  # msgpack raises ValueError, ExtraData, FormatError, StackError, ...
        raise WireError(f"body is not valid msgpack: {type(err).__name__}: {err}") from None


def stack_steps(steps: list[dict]) -> dict:
    """A list of per-step dicts (nested) -> one dict of arrays with a leading time axis [T, ...]."""
    first = steps[0]
    return {
        k: stack_steps([s[k] for s in steps]) if isinstance(v, dict) else np.stack([s[k] for s in steps])
        for k, v in first.items()
    }


def episodes_body(episodes: list[dict]) -> bytes:
    """The body of `POST /v1/episodes`: protocol version and episodes in the RLDS in-memory schema."""
    return packb({"protocol": PROTOCOL_VERSION, "episodes": episodes})
