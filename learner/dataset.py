"""Episodes -> the flat arrays a behaviour-cloning batch is drawn from.

Each step becomes one example: its observation and the action chunk that follows it, a[t : t + H]. Chunk
entries that run past the episode's end are masked out of the loss rather than padded with guesses.
"""

from collections.abc import Sequence

import jax
import numpy as np


def action_chunks(actions: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """actions [T, A] -> (chunks [T, H, A], mask [T, H]) with chunks[t, h] = actions[t + h] where t+h < T."""
    steps = len(actions)
    index = np.arange(steps)[:, None] + np.arange(chunk)[None, :]  # [T, H]
    mask = index < steps
    return actions[np.minimum(index, steps - 1)], mask


def flatten(episodes: Sequence[dict], chunk: int, action_key: str = "action") -> dict[str, np.ndarray]:
    """Stacks every step of every episode: {"obs": {key: [N, ...]}, "chunk": [N, H, A], "mask": [N, H]}."""
    if not episodes:
        raise ValueError("no episodes to train on")
    chunks, masks = zip(*(action_chunks(ep["steps"][action_key], chunk) for ep in episodes), strict=True)
    keys = episodes[0]["steps"]["observation"].keys()
    obs = {k: np.concatenate([ep["steps"]["observation"][k] for ep in episodes]) for k in keys}
    return {
        "obs": obs,
        "chunk": np.concatenate(chunks).astype(np.float32),
        "mask": np.concatenate(masks),
    }


def concatenate(*datasets: dict) -> dict[str, np.ndarray]:
    """Flat datasets (as `flatten` makes them) stacked into one."""
    return {
        "obs": {k: np.concatenate([d["obs"][k] for d in datasets]) for k in datasets[0]["obs"]},
        "chunk": np.concatenate([d["chunk"] for d in datasets]),
        "mask": np.concatenate([d["mask"] for d in datasets]),
    }


def pad(examples: dict, capacity: int) -> dict:
    """The flat examples padded with zeros to `capacity` rows, with `size`: a growing dataset keeps one
    shape, so the update that samples it (`bc.sample_batch`) compiles once."""
    size = len(examples["chunk"])
    if size > capacity:
        raise ValueError(f"{size} examples exceed the dataset capacity {capacity}")

    def grow(x):
        out = np.zeros((capacity, *x.shape[1:]), x.dtype)
        out[:size] = x
        return out

    rows = {k: v for k, v in examples.items() if k != "size"}
    return {**jax.tree.map(grow, rows), "size": np.int32(size)}


def bucket(size: int) -> int:
    """The capacity a dataset of `size` rows is padded to: the next power of two, so a dataset that grows
    round after round compiles its update a logarithmic number of times."""
    return 1 << max(0, int(size - 1).bit_length())
