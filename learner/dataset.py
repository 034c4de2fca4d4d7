"""Episodes -> the flat arrays a behaviour-cloning batch is drawn from.

Each step becomes one example: its observation and the action chunk that follows it, a[t : t + H]. Chunk
entries that run past the episode's end are masked out of the loss rather than padded with guesses.
"""

from collections.abc import Sequence

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
