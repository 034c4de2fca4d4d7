"""The fleet section of `jaxvla bench --fleet`: ingestion, params publish/pull, and control-loop jitter.

- Ingestion: a `jaxvla serve --fleet.no-learner` process on loopback; N client threads (1, 4, 16), each
  a robot pushing its own episodes of the workcell's full length (120 steps) one per request, as the
  uploader does. Episodes/s = episodes acknowledged (durable on disk) / wall time.
- Params: publish = `ParamsRegistry.publish` of the default model's exported file (verify, write, fsync,
  registry update); pull = `FleetClient.params` over loopback plus the client's verification
  (`client.verified_policy`: sha256 and the file's own checksums). Medians over repetitions.
- Jitter: the actor loop (`runner.run_episode`: twin step, numpy policy, teleop check) under `RateClock`
  at 10 and 50 Hz; lateness of each tick against its schedule, p50 / p99.
"""

import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import jax
import numpy as np
from flax import nnx

import configs
from jaxvla import episodes as rlds
from jaxvla import export
from jaxvla import normalization
from jaxvla.actor import client as fleet
from jaxvla.actor import policy as actor_policy
from jaxvla.actor import wire
from jaxvla.actor.runner import RateClock
from jaxvla.actor.runner import run_episode
from learner.fleet.store import ParamsRegistry

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
EPISODE_STEPS = 120  # the workcell's time limit


def _start_service(root: pathlib.Path, robots: int) -> tuple[subprocess.Popen, str, dict[str, str]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tokens = {f"robot-{i}": f"bench-token-{i:04d}-0123456789" for i in range(robots)}
    (root / "tokens.json").write_text(json.dumps(tokens))
    args = [
        "debug",
        "--fleet.no-learner",
        "--fleet.root",
        str(root),
        "--fleet.port",
        str(port),
        "--fleet.tokens",
        str(root / "tokens.json"),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    process = subprocess.Popen(
        [sys.executable, "-m", "jaxvla.cli", "serve", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/healthz", timeout=1).read()
            return process, url, tokens
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("bench: the fleet service did not start")


def bench_ingest(actor_counts=(1, 4, 16), episodes_per_actor: int = 16) -> list[dict]:
    """Episodes/s acknowledged with N concurrent pushing robots."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        process, url, tokens = _start_service(pathlib.Path(tmp), max(actor_counts))
        try:
            for n in actor_counts:
                rows.append(_ingest_row(url, dict(list(tokens.items())[:n]), episodes_per_actor))
        finally:
            process.terminate()
            process.wait()
    return rows


def _ingest_row(url: str, tokens: dict[str, str], episodes_per_actor: int) -> dict:
    """One measurement: every robot in `tokens` pushes its episodes from its own thread."""
    rng = np.random.default_rng(len(tokens))
    bodies = {
        robot: [
            wire.episodes_body([rlds.random_episode(rng, EPISODE_STEPS, robot_id=robot)])
            for _ in range(episodes_per_actor)
        ]
        for robot in tokens
    }
    latencies: list[float] = []

    def push(robot: str) -> None:
        client = fleet.FleetClient(url, tokens[robot], timeout=60)
        for body in bodies[robot]:
            tic = time.perf_counter()
            client.push(body)
            latencies.append(time.perf_counter() - tic)

    threads = [threading.Thread(target=push, args=(robot,)) for robot in bodies]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - tic
    total = len(tokens) * episodes_per_actor
    return {
        "actors": len(tokens),
        "episodes": total,
        "wall_s": wall,
        "episodes_per_s": total / wall,
        "episode_bytes": len(bodies[next(iter(tokens))][0]),
        "push_p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "push_p99_ms": 1e3 * float(np.percentile(latencies, 99)),
    }


def bench_params(data: bytes, reps: int = 5) -> dict:
    """Publish and pull latency of one exported policy file, and its size."""
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        process, url, tokens = _start_service(root, 1)
        client = fleet.FleetClient(url, tokens["robot-0"], timeout=60)
        registry = ParamsRegistry(root / "params")
        manifest, _ = fleet.fileformat.unpack(data)
        publish, pull = [], []
        try:
            for rep in range(reps):
                versioned = _with_version(data, manifest, rep + 1)
                tic = time.perf_counter()
                registry.publish(versioned)
                publish.append(time.perf_counter() - tic)
                tic = time.perf_counter()
                entry = client.manifest()
                fleet.verified_policy(client.params(entry["version"]), entry)
                pull.append(time.perf_counter() - tic)
        finally:
            process.terminate()
            process.wait()
    return {
        "bytes": len(data),
        "publish_ms": 1e3 * statistics.median(publish),
        "pull_verify_ms": 1e3 * statistics.median(pull),
        "reps": reps,
    }


def _with_version(data: bytes, manifest: dict, version: int) -> bytes:
    """The same weights under another version number (the registry only takes newer versions)."""
    _, arrays = fleet.fileformat.unpack(data)
    fields = {k: v for k, v in manifest.items() if k != "sha256"}
    return fleet.fileformat.pack({**fields, "version": version, "parent_version": None}, dict(arrays))


def bench_jitter(data: bytes, rates=(10.0, 50.0), steps: int = 300) -> list[dict]:
    """Control-loop lateness percentiles of the twin actor at each rate."""
    from envs.twin_robot import TwinRobot

    policy, rows = actor_policy.loads(data), []
    robot = TwinRobot("pick_place", "train")
    for hz in rates:
        clock, done, overruns = RateClock(hz), 0, 0
        while done < steps:
            episode = run_episode(robot, policy, clock=clock, seed=done, max_steps=steps - done)
            done += len(episode["steps"]["is_first"])
        overruns = clock.overruns
        rows.append({"hz": hz, "steps": done, "overruns": overruns, **clock.percentiles((50, 99))})
    return rows


def table(result: dict) -> str:
    lines = ["| concurrent actors | episodes/s | push p50 | push p99 |", "|---:|---:|---:|---:|"]
    for r in result["ingest"]:
        lines.append(
            f"| {r['actors']} | {r['episodes_per_s']:.1f} | {r['push_p50_ms']:.1f} ms | "
            f"{r['push_p99_ms']:.1f} ms |"
        )
    p = result["params"]
    lines += [
        "",
        "| params file | publish | pull + verify |",
        "|---:|---:|---:|",
        f"| {p['bytes'] / 1e6:.2f} MB | {p['publish_ms']:.1f} ms | {p['pull_verify_ms']:.1f} ms |",
        "",
        "| control rate | steps | lateness p50 | lateness p99 | overruns |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in result["jitter"]:
        lines.append(
            f"| {r['hz']:.0f} Hz | {r['steps']} | {r['p50_ms']:.3f} ms | {r['p99_ms']:.3f} ms | "
            f"{r['overruns']} |"
        )
    return "\n".join(lines)


def run(data: bytes, episodes_per_actor: int = 16, jitter_steps: int = 300) -> dict:
    return {
        "ingest": bench_ingest(episodes_per_actor=episodes_per_actor),
        "params": bench_params(data),
        "jitter": bench_jitter(data, steps=jitter_steps),
        "episode_steps": EPISODE_STEPS,
    }


def fleet_policy_file() -> bytes:
    """The default model (untrained) exported as the robots receive it."""
    model = configs.get_config("default").model
    _, params = nnx.split(model.create_policy(0), nnx.Param)
    stats = normalization.compute(jax.device_get(model.fake_observation(jax.random.key(0), 256)))
    with tempfile.TemporaryDirectory() as tmp:
        path = export.write(
            pathlib.Path(tmp), model, params, stats, version=1, parent_version=None, config_hash="bench"
        )
        return path.read_bytes()
