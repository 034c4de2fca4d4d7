"""`jaxvla sim [config] [--target.task T --target.split S --env.field value ...]`: the workcell simulator's
showcase.

Runs the scripted operator on `target.task` / `target.split` (`train` by default) for one camera-on
episode (plotted: telemetry and camera frames) and for a vmapped batch of `env.num_envs` episodes without
camera (summarised: success rate, failure modes, retries, cycle time). Writes telemetry.png, frames.png
and summary.json under `{out_dir}/sim/{task}_{split}/`. Each episode is one jitted `lax.scan`; Python
never sees single steps.
"""

import dataclasses
import json
import time
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402

import configs  # noqa: E402
from envs import operator  # noqa: E402
from envs.rollout import rollout  # noqa: E402
from envs.tasks import get_task  # noqa: E402
from envs.workcell import Workcell  # noqa: E402
from jaxvla import schema  # noqa: E402
from learner import compile_cache  # noqa: E402

PROG = "jaxvla sim"
DEFAULTS = {"target": {"split": "train"}}  # the pretraining distribution, which the operator solves
SHOWCASE_RES = 64  # camera pixels per side for the showcase episode
N_FRAMES = 8


def parse_config(argv: Sequence[str]) -> configs.Config:
    """`configs.cli`, with `default` as the config name when none is given (tyro would demand one)."""
    argv = list(argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["default", *argv]
    return configs.cli(argv, PROG, sections=("target", "env"), defaults=DEFAULTS)


def make_env(cfg: configs.Config, camera: bool) -> Workcell:
    """The task's default cell, with the showcase camera on or off."""
    config = get_task(cfg.target.task).default_config
    config = dataclasses.replace(config, camera=camera, camera_res=SHOWCASE_RES)
    return Workcell(cfg.target.task, cfg.target.split, config)


def operator_episode(env: Workcell) -> Callable[[jax.Array], tuple]:
    """key -> (last State, record with a leading [T] axis); the env is frozen once it is done."""

    def run(key):
        key_reset, key_run = jax.random.split(key)
        policy = lambda state, _key: env.operator_action(state)  # noqa: E731
        return rollout(env.step, policy, env.reset(key_reset), key_run, env.config.max_steps)

    return jax.jit(run)


def operator_batch(env: Workcell, num_envs: int) -> Callable[[jax.Array], dict]:
    """key -> the last step's info of `num_envs` operator episodes, each leaf [B, ...]."""

    def run(key):
        key_reset, key_run = jax.random.split(key)
        states = jax.vmap(env.reset)(jax.random.split(key_reset, num_envs))
        policy = lambda state, _key: jax.vmap(env.operator_action)(state)  # noqa: E731
        last, _ = rollout(jax.vmap(env.step), policy, states, key_run, env.config.max_steps)
        return last.info  # frozen at each env's end, so this is every episode's outcome

    return jax.jit(run)


def timed(message: str, fn: Callable, *args):
    """Runs `fn(*args)` between two progress lines, blocking until its arrays are ready."""
    print(f"  {message} ...", flush=True)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    print(f"  {message}: {time.perf_counter() - start:.1f} s", flush=True)
    return out


def compile_and_run(name: str, fn, key: jax.Array):
    """AOT-compiles `fn` for `key`, then runs it; the two phases are timed separately."""
    compiled = timed(f"compile {name}", lambda: fn.lower(key).compile())
    return timed(f"run {name}", compiled, key)


# ------------------------------------------------------------------------------------------ summary
def summarize(info: dict) -> dict:
    """The batch's outcomes from its last-step info (leaves [B]) as plain Python numbers."""
    success = np.asarray(info["success"])
    modes = np.asarray(info["failure_mode"])
    cycle = np.asarray(info["cycle_time"])[success]
    return {
        "episodes": int(success.size),
        "success_rate": float(success.mean()),
        "failure_modes": {name: int((modes == k).sum()) for k, name in enumerate(schema.FAILURE_MODES)},
        "mean_retries": float(np.asarray(info["retries"]).mean()),
        "mean_cycle_time_success": float(cycle.mean()) if cycle.size else None,
    }


def format_summary(summary: dict) -> str:
    """A two-column text table of `summarize`'s output; failure modes that never happened are left out."""
    cycle = summary["mean_cycle_time_success"]
    modes = [(f"  {name}", str(n)) for name, n in summary["failure_modes"].items() if name != "none" and n]
    rows = [
        ("episodes", str(summary["episodes"])),
        ("success rate", f"{summary['success_rate']:.1%}"),
        ("failures", str(summary["episodes"] - summary["failure_modes"]["none"])),
        *modes,
        ("mean retries", f"{summary['mean_retries']:.2f}"),
        ("mean cycle time (successes)", "n/a" if cycle is None else f"{cycle:.2f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


# ------------------------------------------------------------------------------------------ episode
def episode_length(record: dict) -> int:
    """Control steps until the episode ended (or the whole record if it never did)."""
    ended = np.asarray(record["done"]) | np.asarray(record["truncated"])  # [T]
    return int(np.argmax(ended)) + 1 if ended.any() else int(ended.size)


def plot_telemetry(path: Path, info: dict, hz: float, stages: Sequence[str], title: str) -> None:
    """Four panels over time [s]: vacuum, wrist force + slip, stage, events. `info` leaves are [T, ...]."""
    t = (np.arange(len(info["pressure"])) + 1) / hz  # info[k] is the state after step k
    fig, (ax_p, ax_f, ax_s, ax_e) = plt.subplots(
        4, 1, sharex=True, figsize=(9, 8), gridspec_kw={"height_ratios": [1, 1, 0.8, 1]}
    )
    ax_p.plot(t, info["pressure"], color="tab:blue")
    ax_p.set_ylabel("vacuum [kPa]")

    ax_f.plot(t, info["contact_force"], color="tab:orange", label="wrist force")
    ax_f.set_ylabel("wrist force [N]", color="tab:orange")
    ax_slip = ax_f.twinx()
    ax_slip.plot(t, info["slip"], color="tab:purple", label="slip")
    ax_slip.axhline(1.0, color="tab:purple", linestyle="--", linewidth=1)  # load = holding capacity
    ax_slip.set_ylabel("slip (load / hold)", color="tab:purple")

    ax_s.step(t, info["stage"], where="post", color="tab:green")
    ax_s.set_yticks(range(len(stages)), stages)
    ax_s.set_ylim(-0.5, len(stages) - 0.5)
    ax_s.set_ylabel("stage")

    events = np.asarray(info["events"])  # [T, len(EVENTS)]
    for k in range(events.shape[1]):
        ax_e.plot(t[events[:, k]], np.full(events[:, k].sum(), k), "|", markersize=12, markeredgewidth=2)
    ax_e.set_yticks(range(len(schema.EVENTS)), schema.EVENTS)
    ax_e.set_ylim(-0.5, len(schema.EVENTS) - 0.5)
    ax_e.set_xlabel("time [s]")
    ax_e.set_xlim(0, t[-1] + 0.5 / hz)

    for ax in (ax_p, ax_f, ax_s, ax_e):
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_frames(path: Path, images: np.ndarray, stage: np.ndarray, hz: float, stages: Sequence[str]) -> None:
    """A strip of N_FRAMES camera frames spread over the episode. images [T+1, H, W, 4], stage [T+1]."""
    picks = np.linspace(0, len(images) - 1, N_FRAMES).round().astype(int)
    fig, axes = plt.subplots(1, N_FRAMES, figsize=(2 * N_FRAMES, 2.5))
    for ax, k in zip(axes, picks, strict=True):
        ax.imshow(np.clip(images[k, ..., :3], 0, 1), interpolation="nearest")
        ax.set_title(f"t = {k / hz:.1f} s\n{stages[stage[k]]}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def showcase(env: Workcell, key: jax.Array, out: Path, title: str) -> dict:
    """One camera-on operator episode, plotted; returns the operator's label of it."""
    last, record = compile_and_run("showcase episode (camera on)", operator_episode(env), key)
    n = episode_length(record)
    info = jax.tree.map(lambda x: np.asarray(x)[:n], record["info"])
    label = operator.label(jax.tree.map(lambda x: x[-1], info))
    # record["obs"][k] is the state before step k; append the last state so frames span the episode.
    images = np.concatenate([np.asarray(record["obs"]["image"])[:n], np.asarray(last.obs["image"])[None]])
    stage = np.concatenate([[0], info["stage"]])
    hz = env.config.control_hz
    outcome = "success" if label["success"] else label["failure_mode"]
    plot_telemetry(out / "telemetry.png", info, hz, env.spec.stages, f"{title}: {outcome} at {n / hz:.1f} s")
    plot_frames(out / "frames.png", images, stage, hz, env.spec.stages)
    return label


def main(argv: list[str]) -> int:
    cfg = parse_config(argv)
    compile_cache.enable(cfg.compile_cache)
    task, split = cfg.target.task, cfg.target.split
    out = Path(cfg.out_dir) / "sim" / f"{task}_{split}"
    out.mkdir(parents=True, exist_ok=True)
    key_show, key_batch = jax.random.split(jax.random.key(cfg.env.seed))
    title = f"{task}/{split}, scripted operator"

    print(f"jaxvla sim: {title} (config {cfg.name!r})")
    print(f"Each compile takes about 30 s on a 2-core CPU; reruns hit the cache in {cfg.compile_cache}.")
    label = showcase(make_env(cfg, camera=True), key_show, out, title)
    print(
        f"showcase episode: success={label['success']}, failure mode {label['failure_mode']}, "
        f"{label['retries']} retries, cycle time {label['cycle_time']:.2f} s"
    )

    run_batch = operator_batch(make_env(cfg, camera=False), cfg.env.num_envs)
    summary = summarize(compile_and_run(f"{cfg.env.num_envs} episodes (vmapped)", run_batch, key_batch))
    print(format_summary(summary))

    result = {"config": cfg.name, "task": task, "split": split, "batch": summary, "episode": label}
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    for name in ("telemetry.png", "frames.png", "summary.json"):
        print(f"wrote {out / name}")
    return 0
