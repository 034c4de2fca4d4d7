"""What the `--all` report says besides the sections' tables: the machine, and every ratio on one table."""

import contextlib
import importlib.metadata
import os
import platform
from pathlib import Path

import jax
import mujoco
import numpy as np

from tools.bench.client import CLIENT_BOUND
from tools.bench.ratios import RATIO_LABELS
from tools.bench.ratios import ratio_text


def machine() -> dict:
    """What the numbers were measured on."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],  # another engineer's jobs share these cores
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "mujoco": mujoco.__version__,
        "mujoco_mjx": importlib.metadata.version("mujoco-mjx"),
        "numpy": np.__version__,
    }


def machine_line(info: dict, wall: float) -> str:
    return (
        f"jax {info['jax']} ({info['jax_backend']}), mujoco {info['mujoco']}, mjx {info['mujoco_mjx']}; "
        f"load {info['load_avg_1m']:.2f} at the start; {wall / 60:.1f} min in all."
    )


def ratios_table(mjx_rows: list[dict], latency: dict, learner: dict) -> str:
    """Every measured ratio against its peer, with its target where an issue set one."""
    rows = [
        (f"MJX workcell {r['task']} B={r['batch']}: ours / raw mjx.step, steps/s", f"{r['ratio']:.2f}x", None)
        for r in mjx_rows
    ]
    if "state (default)" in latency:
        r = latency["state (default)"]
        rows.append(
            (
                "numpy client p50 / its weights streamed once from memory (lower is better)",
                f"{r['numpy_p50_over_stream']:.2f}x ({r['numpy_p50_us']:.0f} us; stream "
                f"{r['stream_us']:.0f} us)",
                f"<= {CLIENT_BOUND}",
            )
        )
    for key, (label, target) in RATIO_LABELS.items():
        if learner.get("ratios", {}).get(key) is not None:
            rows.append((label, ratio_text(learner["ratios"][key]), f">= {target}" if target else None))
    lines = ["| ratio | value | target |", "|---|---:|---|"]
    lines += [f"| {label} | {value} | {target or '-'} |" for label, value, target in rows]
    return "\n".join(lines)
