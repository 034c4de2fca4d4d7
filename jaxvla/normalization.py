"""Observation normalisation statistics: computed once from data, then travel with the weights.

Training, evaluation and the robot client all normalise with this module (numpy only), so train/deploy
normalisation cannot drift: `normalize` works on jax arrays too because it uses array operators alone;
`standardize` and `OneState`, the robot client's in-place numpy versions, give its numbers bit for bit
(tests/test_actor.py checks).
"""

import threading

import numpy as np

from jaxvla.schema import STATE_KEYS

# Observations that are normalised (the camera image, for models that read it); the prompt's ids are not.
FLOAT_KEYS = (*STATE_KEYS, "image")
# A feature that never varied in the data (a lid that is always open, an unused bin) gets this std,
# so an unseen value at deployment stays finite instead of exploding.
MIN_STD = 1e-2
# Normalised values are clipped: novel items (heavier, more force) must not produce huge activations.
CLIP = 10.0
# As 0-d arrays: numpy converts a Python float operand on every call, a 0-d array operand it need not.
_CLIP_HIGH, _CLIP_LOW = np.array(CLIP, np.float32), np.array(-CLIP, np.float32)


def compute(observations: dict) -> dict[str, dict[str, np.ndarray]]:
    """Per-feature mean and std over every axis but the last: {key: {"mean": [F], "std": [F]}}."""
    stats = {}
    for key in FLOAT_KEYS:
        if key not in observations:
            continue
        x = np.asarray(observations[key], np.float64)
        x = x.reshape(-1, x.shape[-1])
        stats[key] = {
            "mean": x.mean(axis=0).astype(np.float32),
            "std": np.maximum(x.std(axis=0), MIN_STD).astype(np.float32),
        }
    return stats


def normalize(obs: dict, stats: dict) -> dict:
    """Returns obs with every key in `stats` standardised and clipped; other keys pass through."""
    out = dict(obs)
    for key, s in stats.items():
        z = (obs[key] - s["mean"]) / s["std"]
        out[key] = z.clip(-CLIP, CLIP)
    return out


def standardize(x: np.ndarray, s: dict) -> np.ndarray:
    """`normalize` of one numpy array by its statistics {"mean", "std"}: the same numbers bit for bit, in a
    new array and in-place numpy calls (the robot client's path)."""
    z = np.subtract(x, s["mean"])
    z /= s["std"]
    return _clip(z)


class OneState(threading.local):
    """`normalize`'s numbers for one observation's STATE_KEYS vectors, concatenated, in a buffer that is
    reused (one per thread): [S + 1], its last entry a constant 1 for the bias row of the kernel it meets.

    Each vector's mean is subtracted straight into its slice, so the concatenation costs no numpy call of
    its own; then one divide and clip over the whole. The robot client runs this every step.
    """

    def __init__(self, stats: dict):
        """`stats`: {key: {"mean", "std"}} for each of STATE_KEYS, as `compute` gives them."""
        sizes = [len(stats[k]["mean"]) for k in STATE_KEYS]
        self.buffer = np.ones(sum(sizes) + 1, np.float32)
        self.state = self.buffer[:-1]
        self.std = np.concatenate([stats[k]["std"] for k in STATE_KEYS])
        ends = np.cumsum(sizes)
        self.slices = [
            (stats[k]["mean"], self.buffer[end - size : end])
            for k, size, end in zip(STATE_KEYS, sizes, ends, strict=True)
        ]

    def __call__(self, vectors: list[np.ndarray]) -> np.ndarray:
        """The STATE_KEYS vectors [n_k] in order, their shapes checked by the caller -> [S + 1]."""
        for x, (mean, out) in zip(vectors, self.slices, strict=True):
            np.subtract(x, mean, out=out)
        z = self.state
        z /= self.std
        _clip(z)
        return self.buffer


def _clip(z: np.ndarray) -> np.ndarray:
    """z.clip(-CLIP, CLIP) in place, as minimum and maximum (the same for every float, NaN included): a ufunc
    call each, where ndarray.clip goes through Python wrappers first."""
    np.minimum(z, _CLIP_HIGH, out=z)
    return np.maximum(z, _CLIP_LOW, out=z)


def to_lists(stats: dict) -> dict:
    """JSON-ready copy (for manifests)."""
    return {k: {n: np.asarray(v).tolist() for n, v in s.items()} for k, s in stats.items()}


def from_lists(stats: dict) -> dict:
    return {k: {n: np.asarray(v, np.float32) for n, v in s.items()} for k, s in stats.items()}
