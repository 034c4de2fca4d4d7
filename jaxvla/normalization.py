"""Observation normalisation statistics: computed once from data, then travel with the weights.

Training, evaluation and the robot client all call `normalize` from this module (numpy only; it works on
jax arrays too because it uses array operators alone), so train/deploy normalisation cannot drift.
"""

import numpy as np

from jaxvla.schema import STATE_KEYS

# Observations that are normalised (the camera image, for models that read it); the prompt's ids are not.
FLOAT_KEYS = (*STATE_KEYS, "image")
# A feature that never varied in the data (a lid that is always open, an unused bin) gets this std,
# so an unseen value at deployment stays finite instead of exploding.
MIN_STD = 1e-2
# Normalised values are clipped: novel items (heavier, more force) must not produce huge activations.
CLIP = 10.0


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


def to_lists(stats: dict) -> dict:
    """JSON-ready copy (for manifests)."""
    return {k: {n: np.asarray(v).tolist() for n, v in s.items()} for k, s in stats.items()}


def from_lists(stats: dict) -> dict:
    return {k: {n: np.asarray(v, np.float32) for n, v in s.items()} for k, s in stats.items()}
