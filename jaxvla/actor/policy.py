"""`load(path) -> Policy`: run an exported policy with numpy, and hand its chunks out one action a step.

`Policy.infer(obs)` normalises with the manifest's statistics (`jaxvla.normalization`, whose numbers the
learner trains with), runs `forward.PolicyForward`, and returns the action chunk. It takes one
observation as the simulator and robot produce it (`prompt` [L]) or a batch (`prompt` [B, L]). One
observation of the default model takes the fast pass (`forward.StatePass`), with the prompt's share of the
network kept per prompt.
"""

import os

import numpy as np

from jaxvla import normalization
from jaxvla import tokenizer
from jaxvla.actor import fileformat
from jaxvla.actor.forward import PolicyForward
from jaxvla.schema import INDICATOR_NEGATIVE as INDICATOR_NEGATIVE
from jaxvla.schema import INDICATOR_NONE as INDICATOR_NONE
from jaxvla.schema import INDICATOR_POSITIVE as INDICATOR_POSITIVE
from jaxvla.schema import STATE_KEYS

_DTYPES = {"float32": np.float32, "int32": np.int32}
# Prompts whose encoding `Policy` keeps (per policy): a robot runs one prompt an episode, a fleet a few.
PROMPT_CACHE = 64


class Policy:
    """An exported policy, verified and ready to run; stateless between calls."""

    def __init__(self, manifest: dict, arrays: dict[str, np.ndarray]):
        try:
            model = manifest["model"]
            # key -> (shape without batch, dtype): what the network reads; other obs keys are ignored.
            self._inputs = {
                key: (tuple(s["shape"]), _DTYPES[s["dtype"]]) for key, s in manifest["observation"].items()
            }
            stats = normalization.from_lists(manifest["normalization"])
            self._forward = PolicyForward(model, sum(self._inputs[k][0][0] for k in STATE_KEYS), arrays)
            self._conditioned = bool(model["advantage_conditioned"])
            self.chunk, self.action_size = model["chunk"], model["action_size"]
        except (KeyError, TypeError) as err:
            raise fileformat.PolicyFileError(f"the manifest lacks or misstates {err}") from err
        self._stats = state_stats(stats, self._inputs)
        self._one_state = normalization.OneState(stats)  # for `self._forward.one`
        self._prompts: dict = {}  # text or ids bytes -> (None or (dtype, shape), self._forward.prompt(ids))
        self._manifest = manifest

    @property
    def metadata(self) -> dict:
        """The file's manifest: model spec, normalisation, action spec, versions, checksums."""
        return self._manifest

    @property
    def version(self) -> int:
        return self._manifest["version"]

    @property
    def inputs(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """The observation keys the network reads: key -> (shape of one observation, dtype)."""
        return dict(self._inputs)

    def reset(self) -> None:
        """Nothing to clear (the network has no memory); here so brokers and loops can call it blindly."""

    def infer(self, obs: dict, *, indicator=None, rng: np.random.Generator | None = None) -> dict:
        """One observation (or a batch) -> {"actions", "mean", "log_std"} [H, A] (or [B, H, A]).

        `actions` is tanh(mean), or with `rng` a tanh-Gaussian sample (then also "log_prob" [] or [B],
        as `jaxvla.models.distributions.sample` computes it). `indicator` (advantage-conditioned
        policies only): an INDICATOR_* value or one per example; absent means INDICATOR_NONE.
        """
        if "prompt" not in obs:
            raise KeyError("observation lacks 'prompt'")
        batch = _batch_size(obs["prompt"])
        if batch is None and indicator is None and self._forward.one is not None:
            state = self._one_state([self._input(k, obs.get(k), None) for k in STATE_KEYS])
            mean, log_std, squashed = self._forward.one(state, self._prompt(obs["prompt"]))
        else:
            indicator = self._indicator(indicator, batch)
            mean, log_std, squashed = self._forward(*self._network_inputs(obs, batch), indicator)
        out = {"mean": mean, "log_std": log_std}
        if rng is None:
            out["actions"] = squashed
        else:
            u = mean + np.exp(log_std) * rng.standard_normal(mean.shape, np.float32)
            out["actions"] = np.tanh(u)
            out["log_prob"] = _log_prob(u, mean, log_std)
        return out

    def _network_inputs(self, obs: dict, batch: int | None) -> tuple:
        """(normalised state, the network's prompt input, normalised image or None), with a leading [B]
        for a batch."""
        if batch is None:
            prompt = self._prompt(obs["prompt"])
        else:
            prompt = self._forward.prompt(self._input("prompt", _tokens(obs["prompt"]), batch))
        state = np.concatenate([self._input(k, obs.get(k), batch) for k in STATE_KEYS], axis=-1)
        image = None
        if "image" in self._stats:
            image = normalization.standardize(
                self._input("image", obs.get("image"), batch), self._stats["image"]
            )
        return normalization.standardize(state, self._stats["state"]), prompt, image

    def _input(self, key: str, value, batch: int | None) -> np.ndarray:
        """`value` of observation key `key` as the network reads it: [*shape], or [B, *shape] for a batch."""
        if value is None:
            raise KeyError(f"observation lacks {key!r}; the policy reads {sorted(self._inputs)}")
        shape, dtype = self._inputs[key]
        x = np.asarray(value, dtype)
        expected = shape if batch is None else (batch, *shape)
        if x.shape != expected:
            raise ValueError(f"observation {key!r} has shape {x.shape}, expected {expected}")
        return x

    def _prompt(self, prompt) -> np.ndarray:
        """What the network reads of one observation's prompt (text or ids [L]), kept per prompt: a robot
        sends one prompt a whole episode, and checking and encoding it costs a batch-1 pass a dozen numpy
        calls. Keyed on the text or the ids' bytes, dtype and shape; the entry is read-only."""
        if isinstance(prompt, str):
            key, kind = prompt, None
        else:
            prompt = np.asarray(prompt)
            key, kind = prompt.tobytes(), (prompt.dtype, prompt.shape)
        entry = self._prompts.get(key)
        if entry is None or entry[0] != kind:
            # A copy: the caller may reuse its array for the next observation, and the key is its bytes.
            ids = self._input("prompt", _tokens(prompt), None).copy()
            entry = (kind, self._forward.prompt(ids))
            entry[1].setflags(write=False)
            if len(self._prompts) >= PROMPT_CACHE:
                self._prompts.clear()  # start afresh: one call, safe while other threads read
            self._prompts[key] = entry
        return entry[1]

    def _indicator(self, indicator, batch: int | None) -> np.ndarray | None:
        if indicator is None:
            return None
        if not self._conditioned:
            raise ValueError("this policy was not trained with an advantage indicator; pass indicator=None")
        values = np.broadcast_to(np.asarray(indicator, np.intp), () if batch is None else (batch,))
        if values.min() < INDICATOR_NONE or values.max() > INDICATOR_NEGATIVE:
            raise ValueError(f"indicator must be 0 (none), 1 (positive) or 2 (negative), got {indicator}")
        return values


def state_stats(stats: dict, inputs) -> dict:
    """The manifest's statistics for what an encoder reads: "state" (the STATE_KEYS vectors, concatenated
    before normalising, their statistics likewise: normalising is elementwise, so the numbers are those of
    normalising each, in one step instead of four) and "image" if `inputs` has it."""
    missing = sorted(k for k in inputs if k != "prompt" and k not in stats)
    if missing:
        raise fileformat.PolicyFileError(f"the manifest has no normalisation statistics for {missing}")
    state = {n: np.concatenate([stats[k][n] for k in STATE_KEYS]) for n in ("mean", "std")}
    return {"state": state, **({"image": stats["image"]} if "image" in inputs else {})}


def _batch_size(prompt) -> int | None:
    """B for a batch of prompts (ids [B, L]); None for one observation's (text or ids [L])."""
    ndim = prompt.ndim if isinstance(prompt, np.ndarray) else np.ndim(prompt)  # np.ndim costs a call
    return len(prompt) if ndim == 2 else None


def _tokens(prompt) -> np.ndarray:
    """A prompt's token ids [L] or [B, L], checked; a text prompt is encoded with the shared tokenizer."""
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else np.asarray(prompt)
    if ids.size and not (0 <= ids.min() and ids.max() < len(tokenizer.VOCABULARY)):
        raise ValueError(f"prompt token ids must be in [0, {len(tokenizer.VOCABULARY)}), got {ids}")
    return ids


def _log_prob(u: np.ndarray, mean: np.ndarray, log_std: np.ndarray) -> np.ndarray:
    """log pi(tanh(u)) summed over the chunk: [..., H, A] -> [...] (distributions.sample's formula)."""
    z = (u - mean) * np.exp(-log_std)
    gaussian = -0.5 * z**2 - log_std - 0.5 * np.log(2.0 * np.pi)
    log_det = 2.0 * (np.log(2.0) - u - np.logaddexp(0.0, -2.0 * u))
    return np.sum(gaussian - log_det, axis=(-2, -1), dtype=np.float32)


def loads(data: bytes) -> Policy:
    """A Policy from a file's bytes (as pulled from the fleet service); see `load`."""
    return Policy(*fileformat.unpack(data))


def load(path: str | os.PathLike) -> Policy:
    """Reads, verifies (format, version, sha256) and builds an exported policy.

    Raises `PolicyFileError` for a corrupt or truncated file, a foreign one, or a newer format version.
    """
    return Policy(*fileformat.read(path))


class ActionChunkBroker:
    """Hands out one action per step from the latest chunk and re-infers every `replan` steps.

    `replan` = 1 re-plans every step (closed loop); `replan` = chunk executes whole chunks.
    """

    def __init__(self, policy: Policy, replan: int = 1, **infer_kwargs):
        if not 1 <= replan <= policy.chunk:
            raise ValueError(f"replan must be in [1, {policy.chunk}] (the policy's chunk), got {replan}")
        self.policy, self.replan, self._kwargs = policy, replan, infer_kwargs
        self._chunk: dict | None = None
        self._step = 0

    def reset(self) -> None:
        self.policy.reset()
        self._chunk, self._step = None, 0

    def infer(self, obs: dict) -> dict:
        """One observation -> {"actions": [A], "mean": [A], "log_std": [A]}: this step's row of the chunk."""
        if self._chunk is None or self._step == self.replan:
            self._chunk = self.policy.infer(obs, **self._kwargs)
            self._step = 0
        out = {k: v[self._step] for k, v in self._chunk.items() if np.ndim(v) == 2}
        self._step += 1
        return out
