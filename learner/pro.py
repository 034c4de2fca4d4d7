"""The Process-Reward Operator: labels from logged episodes, training, evaluation, and its four uses.

Labels (per step, from an RLDS episode; `episode_labels`):
- the implicit reward r_hat: -time_cost every step (cycle time), -retry_cost per retry, -safety_cost per
  slip, drop or collision event, and at the last step +1 on success or -failure_cost otherwise (a
  timeout is a failure); the progress value's target is its discounted return from the step;
- done: the step ends the episode; success: the episode's outcome (q_t is trained at every step, so
  away from the end it reads as the completion likelihood);
- risk: the first failure a step within [t, t + horizon) announces (drop, slip, missed grasp, collision
  from the events; at a failed episode's last step its failure mode), or "none".
Comparisons (per pair of episodes, `preference`): success beats failure; between successes a stable
one (no slip, drop or missed grasp) beats a recovered one, then fewer retries, then faster by a margin.
A training example is a window of W steps ending at step t, plus a partner window at the same fraction
of another episode; the losses read the window's last step.

Uses: `dense_reward` (Δp - λρ for the patching learner), `ranking_actor` (best of K sampled chunks by
V - λρ, in MJX), `gate` (abort at a retry the termination head calls hopeless), `quality` (a score per
episode), and `score_episodes` (every step's readouts, for evaluation and the episode plot).
"""

import dataclasses
import functools
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats
from flax import nnx

from configs import ProConfig
from envs.cell import COLLISION
from envs.cell import DROP
from envs.cell import EVENTS
from envs.cell import MISSED_GRASP
from envs.cell import SLIP
from envs.cell import TIMEOUT
from jaxvla import models
from jaxvla import normalization
from jaxvla.models import distributions
from jaxvla.models import heads
from jaxvla.models import pro as pro_model
from learner import bc
from learner import sharding
from learner.checkpoints import Checkpoints
from learner.replay import LEARNED_REWARD

EVENT = {name: i for i, name in enumerate(EVENTS)}
SAFETY_EVENTS = [EVENT["slip"], EVENT["drop"], EVENT["collision"]]
UNSTABLE_EVENTS = [EVENT["slip"], EVENT["drop"], EVENT["missed_grasp"]]
# Failure classes a step's events announce; when one step has several, the first listed wins.
EVENT_FAILURES = ((DROP, EVENT["drop"]), (SLIP, EVENT["slip"]), (COLLISION, EVENT["collision"]),
                  (MISSED_GRASP, EVENT["missed_grasp"]))  # fmt: skip
QUALITY = ("success", "stable", "retries", "cycle_time")  # columns of the per-episode quality table


# -------------------------------------------------------------------------------------------- labels
def discounted_returns(reward: np.ndarray, gamma: float) -> np.ndarray:
    out = np.empty_like(reward)
    acc = 0.0
    for t in range(len(reward) - 1, -1, -1):
        acc = reward[t] + gamma * acc
        out[t] = acc
    return out


def implicit_reward(events: np.ndarray, success: bool, pc: ProConfig) -> np.ndarray:
    """r_hat [T] from a step's events [T, N_EVENTS] and the outcome."""
    reward = np.full(len(events), -pc.time_cost, np.float32)
    reward -= pc.retry_cost * events[:, EVENT["retry"]]
    reward -= pc.safety_cost * events[:, SAFETY_EVENTS].any(axis=-1)
    reward[-1] += 1.0 if success else -pc.failure_cost
    return reward


def step_failures(events: np.ndarray, failure_mode: np.ndarray, success: bool) -> np.ndarray:
    """The failure class each step announces [T] (0: none)."""
    out = np.zeros(len(events), np.int32)
    for mode, event in reversed(EVENT_FAILURES):
        out = np.where(events[:, event], mode, out)
    if not success and out[-1] == 0:
        out[-1] = failure_mode[-1] if failure_mode[-1] else TIMEOUT
    return out


def first_within(classes: np.ndarray, horizon: int) -> np.ndarray:
    """[T]: the first nonzero class in [t, t + horizon), else 0."""
    padded = np.concatenate([classes, np.zeros(horizon, classes.dtype)])
    out = np.zeros_like(classes)
    for offset in range(horizon - 1, -1, -1):
        ahead = padded[offset : offset + len(classes)]
        out = np.where(ahead != 0, ahead, out)
    return out


def episode_labels(episode: dict, pc: ProConfig) -> dict[str, np.ndarray]:
    steps, meta = episode["steps"], episode["episode_metadata"]
    events = np.asarray(steps["events"], bool)
    success = bool(meta["success"])
    return {
        "return": discounted_returns(implicit_reward(events, success, pc), pc.gamma),
        "done": np.asarray(steps["is_last"], np.float32),
        "success": np.full(len(events), float(success), np.float32),
        "risk": first_within(step_failures(events, steps["failure_mode"], success), pc.risk_horizon),
    }


def episode_quality(episode: dict) -> np.ndarray:
    """[4]: success, stable (no slip, drop or missed grasp), retries, cycle time."""
    meta, events = episode["episode_metadata"], np.asarray(episode["steps"]["events"], bool)
    stable = not events[:, UNSTABLE_EVENTS].any()
    return np.array([meta["success"], stable, meta["retries"], meta["cycle_time"]], np.float32)


def preference(a: jax.Array, b: jax.Array, faster_margin: float) -> jax.Array:
    """+1 where episode a is better than b, -1 where worse, 0 where the comparisons do not decide.

    a, b [..., 4] quality rows. Stability, retries and speed only rank two successes.
    """
    both = (a[..., 0] > 0) & (b[..., 0] > 0)
    faster = b[..., 3] - a[..., 3]
    signs = [
        jnp.sign(a[..., 0] - b[..., 0]),
        jnp.where(both, jnp.sign(a[..., 1] - b[..., 1]), 0.0),
        jnp.where(both, jnp.sign(b[..., 2] - a[..., 2]), 0.0),
        jnp.where(both & (jnp.abs(faster) > faster_margin), jnp.sign(faster), 0.0),
    ]
    out = jnp.zeros_like(signs[0])
    for sign in reversed(signs):
        out = jnp.where(sign != 0, sign, out)
    return out


# ------------------------------------------------------------------------------------------- dataset
def executed_chunks(actions: np.ndarray, chunk: int) -> np.ndarray:
    """[T, A] executed actions -> [T, H, A]: the H actions from each step on, zeros past the end."""
    padded = np.concatenate([actions, np.zeros((chunk - 1, actions.shape[1]), actions.dtype)])
    return np.stack([padded[i : i + len(actions)] for i in range(chunk)], axis=1)


def build_dataset(episodes: list[dict], pc: ProConfig) -> dict:
    """Every step of `episodes` flat, with its labels and where its episode starts: numpy, device-ready."""
    if not episodes:
        raise ValueError("no episodes to build a PRO dataset from")
    lengths = np.array([len(ep["steps"]["action"]) for ep in episodes])
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    labels = [episode_labels(ep, pc) for ep in episodes]
    obs_keys = episodes[0]["steps"]["observation"].keys()
    return {
        "obs": {k: np.concatenate([ep["steps"]["observation"][k] for ep in episodes]) for k in obs_keys},
        "chunk": np.concatenate([executed_chunks(ep["steps"]["action"], pc.net.chunk) for ep in episodes]),
        "step": np.concatenate([np.arange(n) for n in lengths]).astype(np.int32),
        "episode": np.repeat(np.arange(len(episodes)), lengths).astype(np.int32),
        **{k: np.concatenate([lab[k] for lab in labels]) for k in labels[0]},
        "start": starts.astype(np.int32),
        "length": lengths.astype(np.int32),
        "quality": np.stack([episode_quality(ep) for ep in episodes]),
    }


def is_heldout(episode_id: str, fraction: float) -> bool:
    """A stable split by a hash of the episode id: an episode stays on its side as the store grows."""
    return zlib.crc32(episode_id.encode()) % 1000 < fraction * 1000


def split_heldout(episodes: list[dict], fraction: float) -> tuple[list[dict], list[dict]]:
    """(train, held-out)."""
    held = {i for i, ep in enumerate(episodes) if is_heldout(ep["episode_metadata"]["episode_id"], fraction)}
    return [e for i, e in enumerate(episodes) if i not in held], [episodes[i] for i in sorted(held)]


def gather_windows(data: dict, t: jax.Array, window: int) -> dict:
    """Windows of `window` steps ending at steps t [B]; steps before their episode's start are padding.

    Returns obs {k: [B, W, ...]}, chunk [B, W, H, A], step [B, W], valid [B, W], and the labels of t.
    """
    start = data["start"][data["episode"][t]]
    index = t[:, None] - (window - 1) + jnp.arange(window)
    valid = index >= start[:, None]
    index = jnp.maximum(index, start[:, None])
    take = lambda x: x[index]  # noqa: E731
    return {
        "obs": jax.tree.map(take, data["obs"]),
        "chunk": take(data["chunk"]),
        "step": take(data["step"]),
        "valid": valid,
        "index": t,
        **{k: data[k][t] for k in ("return", "done", "success", "risk")},
    }


def sample_pairs(data: dict, key: jax.Array, batch_size: int, *, window: int, faster_margin: float) -> dict:
    """batch_size/2 windows ending at uniform steps, then as many partners: a uniform other episode at the
    same fraction of its length. `preference` [batch_size/2] compares anchor i with partner i."""
    half = batch_size // 2
    key_t, key_e = jax.random.split(key)
    t = jax.random.randint(key_t, (half,), 0, data["step"].shape[0])
    episode = data["episode"][t]
    fraction = (data["step"][t] + 0.5) / data["length"][episode]
    partner = jax.random.randint(key_e, (half,), 0, data["length"].shape[0])
    offset = jnp.minimum(jnp.floor(fraction * data["length"][partner]).astype(jnp.int32),
                         data["length"][partner] - 1)  # fmt: skip
    both = jnp.concatenate([t, data["start"][partner] + offset])
    batch = gather_windows(data, both, window)
    batch["preference"] = preference(data["quality"][episode], data["quality"][partner], faster_margin)
    return batch


# -------------------------------------------------------------------------------------------- losses
def apply(graphdef: nnx.GraphDef, params: nnx.State, stats: dict, batch: dict) -> dict:
    model = nnx.merge(graphdef, params)
    return model(normalization.normalize(batch["obs"], stats), batch["chunk"], batch["step"], batch["valid"])


def two_hot(x: jax.Array, support: jax.Array) -> jax.Array:
    """[...] scalars -> [..., bins]: the two neighbouring bins, weighted by distance (clipped to range)."""
    x = jnp.clip(x, support[0], support[-1])
    upper = jnp.clip(jnp.searchsorted(support, x, side="right"), 1, len(support) - 1)
    lo, hi = support[upper - 1], support[upper]
    w_hi = (x - lo) / (hi - lo)
    bins = jnp.arange(len(support))
    upper, w_hi = upper[..., None], w_hi[..., None]
    return (bins == upper - 1) * (1 - w_hi) + (bins == upper) * w_hi


def losses(logits: dict, batch: dict, support: jax.Array, pc: ProConfig) -> dict:
    """Every loss on the windows' last step: {name: scalar}. `logits` leaves are [B, W, ...]."""
    last = {k: v[:, -1] for k, v in logits.items()}
    value_ce = optax.softmax_cross_entropy(last["value"], two_hot(batch["return"], support))
    value = heads.expected_value(last["value"], support)
    anchor, partner = jnp.split(value, 2)
    pref = batch["preference"]
    ranked = optax.sigmoid_binary_cross_entropy(pref * (anchor - partner) / pc.comparison_temperature, 1.0)
    decided = (pref != 0).astype(jnp.float32)
    return {
        "value": jnp.mean(value_ce),
        "done": jnp.mean(optax.sigmoid_binary_cross_entropy(last["done"], batch["done"])),
        "success": jnp.mean(optax.sigmoid_binary_cross_entropy(last["success"], batch["success"])),
        "risk": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(last["risk"], batch["risk"])),
        "comparison": jnp.sum(ranked * decided) / jnp.maximum(jnp.sum(decided), 1.0),
    }


def pro_loss(params, batch, *, graphdef, stats, support, pc: ProConfig) -> tuple[jax.Array, dict]:
    terms = losses(apply(graphdef, params, stats, batch), batch, support, pc)
    total = terms["value"] + terms["done"] + terms["success"] + terms["risk"]
    total = total + pc.comparison_weight * terms["comparison"]
    return total, {"loss": total, **terms}


# ------------------------------------------------------------------------------------------ training
@dataclasses.dataclass(frozen=True)
class Pro:
    """A trained PRO: network, params and the normalisation statistics it was trained with."""

    net: pro_model.ProNetConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    stats: dict

    def outputs(self, batch: dict) -> dict:
        """Readouts {value, done, success, rho, risk} per step of batch (obs, chunk, step, valid)."""
        return pro_model.readouts(apply(self.graphdef, self.params, self.stats, batch), self.net.support())


def make_train_steps(graphdef, stats, optimizer, pc: ProConfig, mesh=None):
    """The jitted block of `pc.log_every` updates (state donated; data replicated, batch sharded)."""
    loss_fn = functools.partial(pro_loss, graphdef=graphdef, stats=stats, support=pc.net.support(), pc=pc)
    update_fn = functools.partial(bc.update, loss_fn=loss_fn, optimizer=optimizer)
    sample = functools.partial(sample_pairs, window=pc.net.window, faster_margin=pc.faster_margin_s)
    mesh = mesh or sharding.make_mesh()
    sharding.check_batch_size(pc.batch_size, mesh)
    replicated = sharding.replicated(mesh)
    fn = functools.partial(
        bc.train_steps, num_steps=pc.log_every, batch_size=pc.batch_size,
        batch_sharding=sharding.batch_sharded(mesh), update_fn=update_fn, sample_fn=sample,
    )  # fmt: skip
    return jax.jit(fn, donate_argnums=0, in_shardings=(replicated,) * 3, out_shardings=replicated)


def checkpoint_meta(pc: ProConfig, stats: dict) -> dict:
    return {"pro": dataclasses.asdict(pc), "net": pc.net.to_dict(), "stats": normalization.to_lists(stats)}


def load(run_dir: str | pathlib.Path) -> Pro:
    """The PRO saved in `run_dir` (its latest checkpoint)."""
    checkpoints = Checkpoints(pathlib.Path(run_dir) / "checkpoints")
    meta = checkpoints.restore_meta()
    net = pro_model.ProNetConfig.from_dict(meta["net"])
    graphdef, params = nnx.split(net.create(0), nnx.Param)
    state, _ = checkpoints.restore(bc.init_state(params, bc.make_optimizer(1.0, 1, 0, 0.0)))
    checkpoints.close()
    return Pro(net, graphdef, state.params, normalization.from_lists(meta["stats"]))


# ------------------------------------------------------------------------------------ whole episodes
def sequence_batch(obs: dict, actions: jax.Array, valid: jax.Array, chunk: int) -> dict:
    """Whole sequences (obs {k: [B, T, ...]}, executed actions [B, T, A], valid [B, T]) -> a model batch
    that scores every step at once (the band mask gives each step its own window)."""
    actions = jnp.where(valid[..., None], actions, 0.0)
    padded = jnp.concatenate([actions, jnp.zeros_like(actions[:, : chunk - 1])], axis=1)
    steps = actions.shape[1]
    chunks = jnp.stack([padded[:, i : i + steps] for i in range(chunk)], axis=2)
    step = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), valid.shape)
    return {"obs": obs, "chunk": chunks, "step": step, "valid": valid}


def pad_episodes(episodes: list[dict], length: int) -> tuple[dict, np.ndarray, np.ndarray]:
    """(obs {k: [B, length, ...]}, actions [B, length, A], valid [B, length]) with zeros past each end."""

    def pad(x):
        out = np.zeros((length, *x.shape[1:]), x.dtype)
        out[: len(x)] = x[:length]
        return out

    obs_keys = episodes[0]["steps"]["observation"].keys()
    obs = {k: np.stack([pad(ep["steps"]["observation"][k]) for ep in episodes]) for k in obs_keys}
    actions = np.stack([pad(ep["steps"]["action"]) for ep in episodes])
    valid = np.stack([np.arange(length) < len(ep["steps"]["action"]) for ep in episodes])
    return obs, actions, valid


def score_episodes(pro: Pro, episodes: list[dict], *, length: int = 128, batch: int = 64) -> list[dict]:
    """Every step's readouts for each episode: [{value, done, success, rho, risk}] with [T] / [T, K]."""

    @jax.jit
    def run(obs, actions, valid):
        return pro.outputs(sequence_batch(obs, actions, valid, pro.net.chunk))

    out = []
    for i in range(0, len(episodes), batch):
        group = episodes[i : i + batch]
        group = group + [group[-1]] * (batch - len(group))  # one compiled shape
        readouts = jax.device_get(run(*pad_episodes(group, length)))
        for b, ep in enumerate(episodes[i : i + batch]):
            n = len(ep["steps"]["action"])
            out.append({k: np.asarray(v[b, :n]) for k, v in readouts.items()})
    return out


# ---------------------------------------------------------------------------------------------- uses
def dense_reward(value: jax.Array, rho: jax.Array, valid: jax.Array, success: jax.Array, *, gamma: float,
                 risk_weight: float, failure_cost: float) -> jax.Array:  # fmt: skip
    """r_t = gamma V(s_{t+1}) - V(s_t) - λ rho_t over [B, T]; the state after an episode's last step is
    valued at its verified outcome (+1 success, -failure_cost otherwise). Zero on padding.

    Summed over an episode the progress terms telescope to (about) the outcome minus V(s_0): potential
    shaping (Ng et al. 1999) of the operator's sparse label, which keeps the optimal policy, plus the
    risk penalty.
    """
    outcome = jnp.where(success, 1.0, -failure_cost)[:, None]
    after = jnp.concatenate([value[:, 1:], jnp.zeros_like(value[:, :1])], axis=1)
    is_last = valid & ~jnp.concatenate([valid[:, 1:], jnp.zeros_like(valid[:, :1])], axis=1)
    after = jnp.where(is_last, outcome, after)
    return jnp.where(valid, gamma * after - value - risk_weight * rho, 0.0)


def window_from_history(history: dict, obs: dict, step: jax.Array, candidates: jax.Array) -> dict:
    """The window ending now, once per candidate chunk: a model batch [B*K, W].

    history (from envs.wrappers.History): obs {k: [B, W, ...]} and executed action [B, W, A] of the W
    previous steps, oldest first, valid [B, W]; obs {k: [B, ...]} now; step [B]; candidates [K, B, H, A].
    Step s of the window embeds the actions executed from s on: the recorded ones up to now, then the
    candidate's.
    """
    k, b, h, a = candidates.shape
    w = history["valid"].shape[1]
    window_obs = jax.tree.map(lambda past, now: jnp.concatenate([past[:, 1:], now[:, None]], axis=1),
                              history["obs"], obs)  # fmt: skip
    past = jnp.broadcast_to(history["action"][None, :, 1:], (k, b, w - 1, a))
    sequence = jnp.concatenate([past, candidates], axis=2)  # [K, B, W-1+H, A]
    chunks = jnp.stack([sequence[:, :, i : i + w] for i in range(h)], axis=3)  # [K, B, W, H, A]
    valid = jnp.concatenate([history["valid"][:, 1:], jnp.ones((b, 1), bool)], axis=1)
    steps = step[:, None] - (w - 1) + jnp.arange(w)
    tile = lambda x: jnp.broadcast_to(x[None], (k, *x.shape)).reshape(k * b, *x.shape[1:])  # noqa: E731
    return {
        "obs": jax.tree.map(tile, window_obs),
        "chunk": chunks.reshape(k * b, w, h, a),
        "step": tile(steps),
        "valid": tile(valid),
    }


def ranking_actor(policy_graphdef, policy_stats: dict, pro: Pro, *, samples: int, risk_weight: float):
    """(policy params, env state, key) -> action [B, A]: sample K chunks from the policy, score each by
    V - λ rho at the current step, execute the first action of the best (the env needs a History wrapper)."""

    def act(params, state, key):
        obs = normalization.normalize(state.obs, policy_stats)
        mean, log_std = models.apply(policy_graphdef, params, obs)
        candidates = jax.vmap(lambda k: distributions.sample(k, mean, log_std)[0])(
            jax.random.split(key, samples)
        )  # [K, B, H, A]
        batch = window_from_history(state.info["history"], state.obs, state.cell.step, candidates)
        out = pro.outputs(batch)
        score = (out["value"] - risk_weight * out["rho"])[:, -1].reshape(samples, -1)  # [K, B]
        best = jnp.argmax(score, axis=0)
        return jnp.take_along_axis(candidates, best[None, :, None, None], axis=0)[0, :, 0]

    return act


def gate(readouts: dict, events: np.ndarray, min_success: float) -> int | None:
    """The step a retry gate would stop the episode at: the first retry event where q_t < min_success."""
    retries = np.flatnonzero(np.asarray(events)[:, EVENT["retry"]] & (readouts["success"] < min_success))
    return int(retries[0]) if len(retries) else None


def quality(readouts: dict, risk_weight: float) -> float:
    """Per-episode execution score: mean over steps of V - λ rho (higher is better)."""
    return float(np.mean(readouts["value"] - risk_weight * readouts["rho"]))


# ---------------------------------------------------------------------------------------- evaluation
def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (nan where either side is constant)."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(scipy.stats.spearmanr(x, y).statistic)


def auroc(score: np.ndarray, label: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney)."""
    label = np.asarray(label, bool)
    pos, neg = label.sum(), (~label).sum()
    if pos == 0 or neg == 0:
        return float("nan")
    r = scipy.stats.rankdata(score)
    return float((r[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def calibration_error(prob: np.ndarray, label: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: the count-weighted mean |mean prob - frequency| over equal-width bins."""
    prob, label = np.asarray(prob, float), np.asarray(label, float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.sum() * abs(prob[inside].mean() - label[inside].mean())
    return float(error / len(prob))


def lead_time(rho: np.ndarray, event_step: int, threshold: float) -> int:
    """Steps the alarm (rho > threshold) has been on without a break when the event happens at
    `event_step`: 0 if it is off then (the step's own output counts: it sees the action that drops)."""
    on = np.asarray(rho[: event_step + 1]) > threshold
    off = np.flatnonzero(~on)
    return int(event_step - off[-1]) if len(off) else event_step + 1


def evaluation(episodes: list[dict], readouts: list[dict], pc: ProConfig) -> dict:
    """Held-out figures: progress order, risk discrimination, calibration and lead time, termination."""
    labels = [episode_labels(ep, pc) for ep in episodes]
    success = np.array([bool(ep["episode_metadata"]["success"]) for ep in episodes])
    voc = [
        spearman(r["value"], np.arange(len(r["value"]))) for r, s in zip(readouts, success, strict=True) if s
    ]
    rho = np.concatenate([r["rho"] for r in readouts])
    at_risk = np.concatenate([lab["risk"] for lab in labels]) > 0
    done = np.concatenate([lab["done"] for lab in labels]) > 0
    d = np.concatenate([r["done"] for r in readouts])
    leads = []
    for ep, r in zip(episodes, readouts, strict=True):
        drops = np.flatnonzero(np.asarray(ep["steps"]["events"])[:, EVENT["drop"]])
        if len(drops):
            leads.append(lead_time(r["rho"], int(drops[0]), pc.risk_threshold))
    final_q = np.array([r["success"][-1] for r in readouts])
    scores = np.array([quality(r, pc.risk_weight) for r in readouts])
    implicit = np.array([lab["return"][0] for lab in labels])
    return {
        "episodes": len(episodes),
        "steps": int(len(rho)),
        "success_episodes": int(success.sum()),
        "value_order_correlation": {
            "mean": float(np.nanmean(voc)),
            "median": float(np.nanmedian(voc)),
            "episodes": len(voc),
        },  # fmt: skip
        "risk_auroc": auroc(rho, at_risk),
        "risk_positive_rate": float(at_risk.mean()),
        "risk_calibration_error": calibration_error(rho, at_risk),
        "drops": len(leads),
        "drop_lead_steps": {
            "median": float(np.median(leads)) if leads else None,
            "mean": float(np.mean(leads)) if leads else None,
            "warned": float(np.mean(np.array(leads) >= 2)) if leads else None,
        },  # fmt: skip
        "termination_accuracy": float(np.mean((d > 0.5) == done)),
        "termination_balanced_accuracy": float(0.5 * (np.mean(d[done] > 0.5) + np.mean(d[~done] <= 0.5))),
        "outcome_accuracy_at_end": float(np.mean((final_q > 0.5) == success)),
        "quality_vs_implicit_return_spearman": spearman(scores, implicit),
        "quality_success_auroc": auroc(scores, success),
    }


def gated_outcomes(episodes: list[dict], readouts: list[dict], min_success: float, hz: float) -> dict:
    """What retry gating would have done to each episode: stopped at the gate (a failure, shorter), or
    left alone. Returns per-episode success, cycle time and whether it was stopped."""
    success, cycle, stopped = [], [], []
    for ep, r in zip(episodes, readouts, strict=True):
        meta = ep["episode_metadata"]
        at = gate(r, ep["steps"]["events"], min_success)
        stopped.append(at is not None)
        success.append(bool(meta["success"]) and at is None)
        cycle.append((at + 1) / hz if at is not None else float(meta["cycle_time"]))
    return {"success": np.array(success), "cycle_time": np.array(cycle), "stopped": np.array(stopped)}


def relabel(pro_: Pro, block: dict, success: jax.Array, *, gamma: float, risk_weight: float,
            failure_cost: float) -> dict:  # fmt: skip
    """A replay insert block [B, T] (learner.patch.episode_block) with PRO's dense reward in place of the
    operator's sparse one, marked as a learned reward. success [B]: each episode's verified outcome."""
    batch = sequence_batch(block["obs"], block["action"], block["valid"], pro_.net.chunk)
    out = pro_.outputs(batch)
    reward = dense_reward(out["value"], out["rho"], block["valid"], success, gamma=gamma,
                          risk_weight=risk_weight, failure_cost=failure_cost)  # fmt: skip
    return {**block, "reward": reward, "reward_source": jnp.full_like(block["reward_source"], LEARNED_REWARD)}


def relabel_episodes(pro_: Pro, episodes: list[dict], *, gamma: float, risk_weight: float,
                     failure_cost: float) -> list[dict]:  # fmt: skip
    """RLDS episodes with PRO's dense reward in `steps.reward` (the offline source, relabelled once)."""
    out = []
    for ep, r in zip(episodes, score_episodes(pro_, episodes), strict=True):
        valid = np.ones((1, len(r["value"])), bool)
        success = np.array([bool(ep["episode_metadata"]["success"])])
        reward = dense_reward(r["value"][None], r["rho"][None], valid, success, gamma=gamma,
                              risk_weight=risk_weight, failure_cost=failure_cost)[0]  # fmt: skip
        out.append({**ep, "steps": {**ep["steps"], "reward": np.asarray(reward, np.float32)}})
    return out
