"""A word-level prompt tokenizer whose vocabulary lives in the repository (no download).

The simulator encodes its goal prompts with it, the learner embeds the ids, and the numpy robot client
encodes an operator's prompt with the same table, so all three agree by construction. Standard library,
numpy and `jaxvla.schema`.
"""

import re

import numpy as np

from jaxvla.schema import PROMPT_LENGTH

PAD, UNK = 0, 1

# Order is part of the format: an id names a row of every trained embedding table. Append, never reorder.
VOCABULARY = (
    "<pad>",
    "<unk>",
    *"pick place put the a part in into bin compartment and it then".split(),
    *"open box lid remove sort by colour from tote".split(),
    *"red green blue yellow".split(),
    *"cylinder block".split(),
    *"1 2 3".split(),
    *"advantage positive negative".split(),
)
_IDS = {word: i for i, word in enumerate(VOCABULARY)}


def encode(text: str, length: int = PROMPT_LENGTH) -> np.ndarray:
    """Lower-cases, splits on non-alphanumerics and maps words to ids: [length] int32, PAD-filled.

    Raises ValueError when the prompt has more words than `length`, rather than silently cutting it.
    """
    words = re.findall(r"[a-z0-9]+", text.lower())
    if len(words) > length:
        raise ValueError(f"prompt has {len(words)} words, more than the {length} the model reads: {text!r}")
    ids = np.full(length, PAD, dtype=np.int32)
    ids[: len(words)] = [_IDS.get(w, UNK) for w in words]
    return ids


def decode(ids) -> str:
    """The inverse of `encode`, for logs and plots (unknown words come back as <unk>)."""
    return " ".join(VOCABULARY[int(i)] for i in np.asarray(ids) if int(i) != PAD)
