"""The process-reward model on the robot, with numpy: rank candidate action chunks by V - λρ.

    pro = jaxvla.actor.pro.load("pro.msgpack")                 # a `jaxvla pro train` export
    ranked = RankedPolicy(jaxvla.actor.load("policy-v000012.msgpack"), pro, samples=8)
    chunk = ranked.infer(obs)["actions"]    # the best of the deterministic chunk and 7 sampled ones

`ProForward` mirrors `jaxvla.models.pro.ProcessRewardModel` op for op (the blocks are `forward.py`'s;
tests/test_pro.py checks it against JAX). `RankedPolicy` keeps the last W observations and executed
actions, which the model's window reads. numpy, msgpack and the standard library only.
"""

import os

import numpy as np

from jaxvla import normalization
from jaxvla.actor import fileformat
from jaxvla.actor.forward import StateEncoder
from jaxvla.actor.forward import TransformerBlock
from jaxvla.actor.forward import Weights
from jaxvla.actor.forward import softmax
from jaxvla.actor.policy import Policy
from jaxvla.actor.policy import state_stats
from jaxvla.schema import STATE_KEYS

F32 = np.float32


def band_mask(valid: np.ndarray, window: int) -> np.ndarray:
    """jaxvla.models.pro.band_mask: [B, T] -> [B, T, T]."""
    t = np.arange(valid.shape[-1])
    age = t[:, None] - t[None, :]
    return ((age >= 0) & (age < window) & valid[..., None, :]) | np.eye(valid.shape[-1], dtype=bool)


class ProForward:
    """(normalised obs with "state" [B, T, S], chunks [B, T, H, A], steps [B, T], valid [B, T]) ->
    readouts {value, done, success, rho} [B, T] and risk [B, T, K]."""

    def __init__(self, net: dict, state_size: int, arrays: dict[str, np.ndarray]):
        w = Weights(arrays)
        width, self.net = net["width"], net
        self.encoder = StateEncoder(w, net, state_size)
        # Files written before the flag existed embed the chunk.
        self.action_input = net.get("action_input", True)
        action_width = net["action_width"] if self.action_input else 0
        if self.action_input:
            self.action = w.mlp("action", net["chunk"] * net["action_size"], (net["action_width"],))
        self.fuse = w.linear("fuse", width + action_width + 1, width)
        self.temporal = TransformerBlock(w, "temporal", width, net["heads"], net["mlp_ratio"])
        self.norm = w.norm("norm", width)
        self.value = w.linear("value", width, net["value_bins"])
        self.termination = w.linear("termination", width, 2)
        self.risk = w.linear("risk", width, net["risk_classes"])
        self.support = np.linspace(*net["value_range"], net["value_bins"], dtype=F32)
        w.check_all_used()

    def __call__(self, obs: dict, chunks: np.ndarray, steps: np.ndarray, valid: np.ndarray) -> dict:
        b, t = steps.shape
        time = (steps.astype(F32) / F32(self.net["time_scale"]))[..., None]
        parts = [self.encoder(obs)]
        if self.action_input:
            parts.append(self.action(chunks.reshape(b, t, -1)))
        tokens = np.concatenate([*parts, time], axis=-1)
        x = self.temporal(self.fuse(tokens), band_mask(valid, self.net["window"])[:, None])
        x = self.norm(x)
        done, success = np.moveaxis(self.termination(x), -1, 0)
        risk = softmax(self.risk(x))
        return {
            "value": softmax(self.value(x)) @ self.support,
            "done": 1.0 / (1.0 + np.exp(-done)),
            "success": 1.0 / (1.0 + np.exp(-success)),
            "rho": 1.0 - risk[..., 0],
            "risk": risk,
        }


class ProcessReward:
    """An exported PRO, verified and ready to score windows of raw observations."""

    def __init__(self, manifest: dict, arrays: dict[str, np.ndarray]):
        if manifest.get("kind") != "pro":
            raise fileformat.PolicyFileError("not a process-reward model file (manifest kind is not 'pro')")
        try:
            self.net = manifest["pro"]
            sizes = {k: s["shape"] for k, s in manifest["observation"].items()}
            self._stats = state_stats(normalization.from_lists(manifest["normalization"]), sizes)
            self._forward = ProForward(self.net, sum(sizes[k][0] for k in STATE_KEYS), arrays)
        except (KeyError, TypeError) as err:
            raise fileformat.PolicyFileError(f"the manifest lacks or misstates {err}") from err
        self.window, self.chunk = self.net["window"], self.net["chunk"]

    def __call__(self, obs: dict, chunks: np.ndarray, steps: np.ndarray, valid: np.ndarray) -> dict:
        """Raw obs {k: [B, T, ...]} (as the simulator or robot gives them) -> readouts per step."""
        inputs = {
            "state": np.concatenate([np.asarray(obs[k], F32) for k in STATE_KEYS], axis=-1),
            "prompt": np.asarray(obs["prompt"]),
        }
        if "image" in self._stats:
            inputs["image"] = np.asarray(obs["image"], F32)
        return self._forward(
            normalization.normalize(inputs, self._stats),
            np.asarray(chunks, F32),
            np.asarray(steps),
            np.asarray(valid, bool),
        )


def load(path: str | os.PathLike) -> ProcessReward:
    return ProcessReward(*fileformat.read(path))


class RankedPolicy:
    """Ranks K candidates from `policy` (its deterministic chunk and K - 1 samples) and executes the one
    PRO scores best (V - λρ at this step, the deterministic chunk credited `margin`; train PRO with
    `conservative` > 0 for ranking).

    Call `infer(obs)` once per control step; it records the observation and the first action of the
    chunk it returns as executed. When a teleoperator overrides that action, call `executed(action)`.
    """

    def __init__(
        self,
        policy: Policy,
        pro: ProcessReward,
        *,
        samples: int = 8,
        risk_weight: float = 0.5,
        margin: float = 0.0,
        rng: np.random.Generator | None = None,
    ):
        if pro.chunk != policy.chunk:
            raise ValueError(f"PRO embeds chunks of {pro.chunk} actions, the policy makes {policy.chunk}")
        self.policy, self.pro, self.samples, self.risk_weight = policy, pro, samples, risk_weight
        self.margin = margin  # credited to the deterministic chunk (learner.pro.ranking_scores)
        self.rng = rng or np.random.default_rng()
        self.reset()

    def reset(self) -> None:
        self._obs: list[dict] = []
        self._actions: list[np.ndarray] = []
        self.step = 0

    def infer(self, obs: dict) -> dict:
        """{"actions": [H, A] the chosen chunk, "scores": [K], "candidates": [K, H, A]}."""
        k, w = self.samples, self.pro.window
        batch = {key: np.repeat(np.asarray(v)[None], k, axis=0) for key, v in obs.items()}
        drawn = self.policy.infer(batch, rng=self.rng)
        # Candidate 0 is the deterministic chunk, so ranking can always fall back on the policy itself.
        candidates = np.concatenate([np.tanh(drawn["mean"][:1]), drawn["actions"][1:]])  # [K, H, A]
        past = self._obs[-(w - 1) :] if w > 1 else []
        window = [*past, obs]
        pad = w - len(window)
        stacked = {key: np.stack([np.asarray(o[key]) for o in [window[0]] * pad + window]) for key in obs}
        actions = np.zeros((w - 1, candidates.shape[-1]), F32)
        if pad < w - 1:
            actions[pad:] = np.asarray(self._actions[-(w - 1 - pad) :])
        sequence = np.concatenate([np.broadcast_to(actions, (k, *actions.shape)), candidates], axis=1)
        chunks = np.stack([sequence[:, i : i + w] for i in range(self.pro.chunk)], axis=2)  # [K, W, H, A]
        valid = np.arange(w) >= pad
        steps = self.step - (w - 1) + np.arange(w)
        out = self.pro(
            {key: np.broadcast_to(v[None], (k, *v.shape)) for key, v in stacked.items()},
            chunks,
            np.broadcast_to(steps, (k, w)),
            np.broadcast_to(valid, (k, w)),
        )
        scores = out["value"][:, -1] - self.risk_weight * out["rho"][:, -1]
        scores[0] += self.margin
        best = int(np.argmax(scores))
        self._obs = [*past, obs]
        self._actions = [*self._actions[-(w - 1) :], candidates[best, 0]]
        self.step += 1
        return {"actions": candidates[best], "scores": scores, "candidates": candidates}

    def executed(self, action: np.ndarray) -> None:
        """The action actually executed at the last step (a teleoperator's override)."""
        self._actions[-1] = np.asarray(action, F32)
