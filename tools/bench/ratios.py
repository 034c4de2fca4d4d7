"""Our speed over each peer's, from the learner and replay sections, with the spread of the per-repetition
ratios and the targets issue 23 set."""

import numpy as np

from tools.bench.measure import PEER_MISSING


def paired_spread(ours_s: list[float], peer_s: list[float], repetitions: int) -> list[float]:
    """[min, max] of the per-repetition speed ratios ours / peer (peer seconds over ours for the same work).

    Repetition i of both ran back to back, so the ratios pair runs under the same load. Calls timed one by
    one (replay adds) are first summed into `repetitions` consecutive groups.
    """
    groups = min(repetitions, len(ours_s), len(peer_s))

    def grouped(times: list[float]) -> list[float]:
        return [float(np.sum(part)) for part in np.array_split(np.asarray(times[: len(ours_s)]), groups)]

    ratios = [peer / ours for ours, peer in zip(grouped(ours_s), grouped(peer_s), strict=True)]
    return [min(ratios), max(ratios)]


# Each ratio: (ours, the peer, the rate compared, the per-repetition times compared for the spread).
RATIO_SOURCES = {
    "fused_over_torch": ("jax_fused", "torch", "train_steps_per_s", "call_s"),
    "fused_over_torch_same_threads": ("jax_fused", "torch_same_threads", "train_steps_per_s", "call_s"),
    "fused_over_unfused": ("jax_fused", "jax_unfused", "train_steps_per_s", "call_s"),
    "fused_over_flashbax_fused": ("jax_fused", "jax_flashbax", "train_steps_per_s", "call_s"),
    "draw_over_flashbax": ("draw_ours", "draw_flashbax", "draw_steps_per_s", "call_s"),
    "add_over_flashbax": ("ours", "flashbax", "add_items_per_s", "add_s"),
    "sample_over_flashbax": ("ours", "flashbax", "sample_items_per_s", "sample_s"),
    "sample_over_flashbax_nstep": ("ours", "flashbax_nstep", "sample_items_per_s", "sample_s"),
}


def learner_ratios(learner: dict, replay_row: dict, reps: int) -> dict:
    """The issue's ratios of medians, each with the spread of its per-repetition ratios; None where a peer
    is missing."""
    rows = {**learner, **replay_row, "torch_same_threads": learner["torch"].get("same_threads", {})}
    ratios = {}
    for key, (ours_name, peer_name, rate, times) in RATIO_SOURCES.items():
        ours, peer = rows.get(ours_name, {}), rows.get(peer_name, {})
        if rate not in ours or rate not in peer:
            ratios[key] = None
            continue
        spread = paired_spread(ours[times], peer[times], reps)
        ratios[key] = {"value": ours[rate] / peer[rate], "spread": spread}
    return ratios


# Labels of the learner's ratios and the targets issue 23 set (None: reported, no target).
RATIO_LABELS = {
    "fused_over_torch": ("SAC fused JAX / PyTorch eager at its fastest thread count, train steps/s", 1.5),
    "fused_over_torch_same_threads": ("SAC fused JAX / PyTorch eager on as many threads, train steps/s", 1.5),
    "fused_over_unfused": ("SAC fused / unfused JAX, train steps/s", None),
    "fused_over_flashbax_fused": ("SAC fused, our replay / flashbax, train steps/s", 0.9),
    "draw_over_flashbax": ("fused sample (a train step's batches, in one jit), ours / flashbax", 1.0),
    "add_over_flashbax": ("replay add, ours / flashbax", 1.0),
    "sample_over_flashbax": ("replay sample, ours / flashbax raw sequences", 1.0),
    "sample_over_flashbax_nstep": ("replay sample, ours / flashbax + n-step", 1.0),
}


def ratio_text(ratio: dict | None) -> str:
    """'1.23x (per repetition 1.10-1.35)', or the missing peer's status."""
    if ratio is None:
        return PEER_MISSING
    low, high = ratio["spread"]
    return f"{ratio['value']:.2f}x (per repetition {low:.2f}-{high:.2f})"


def ratio_lines(ratios: dict) -> str:
    lines = []
    for key, (label, target) in RATIO_LABELS.items():
        ratio, text = ratios[key], ratio_text(ratios[key])
        if target is not None and ratio is not None:
            text += f" (target >= {target}: {'met' if ratio['value'] >= target else 'missed'})"
        lines.append(f"{label}: {text}")
    return "\n".join(lines)
