"""A robot's life on the fleet: `run` drives a `RobotInterface` for N episodes with the fleet's params.

    from jaxvla.actor.client import FleetClient
    from jaxvla.actor.loop import run, summary

    result = run(MyArm("arm-3"), FleetClient(url, token), pathlib.Path("/var/lib/jaxvla"), episodes=10, hz=10)
    print(summary(result))

Params are pulled in the background, verified, cached on disk (a restarted robot starts at once with its
cached policy) and swapped between episodes. Every episode is spooled to disk before anything else and
pushed by a background uploader. A token the service refuses, or one of another robot, stops the robot
before its first episode; an episode the service refuses later is logged, counted and kept in
`<folder>/spool/rejected`. `jaxvla actor` is this loop around the C-MuJoCo twin (tools/actor.py).
Standard library, numpy and msgpack only, like the rest of `jaxvla.actor`.
"""

import collections
import json
import os
import pathlib
import time
from typing import NamedTuple

from jaxvla.actor import client as fleet
from jaxvla.actor import robots
from jaxvla.actor import wire
from jaxvla.actor.policy import Policy
from jaxvla.actor.runner import RateClock
from jaxvla.actor.runner import run_episode

PROG = "jaxvla actor"  # how the start-up errors name the robot, from the command or from Python


class RunResult(NamedTuple):
    """What `run` did: one record per episode, and the uploader's counts at the end."""

    records: list[dict]
    uploads: dict  # pushed, duplicates, rejected (4xx: never stored), failures (retried), spooled (left)
    last_rejection: str | None  # the service's reason for the last refused episode


def run(
    robot: robots.RobotInterface,
    client: fleet.FleetClient,
    folder: pathlib.Path,
    *,
    episodes: int,
    hz: float,
    replan: int = 1,
    seed: int = 0,
    log: pathlib.Path | None = None,
    wait_s: float = 120.0,
    poll_s: float = 2.0,
) -> RunResult:
    """Runs `episodes` episodes on `robot` with the fleet's params.

    Fails at start-up (SystemExit naming the cause), before the robot moves: a token the service does not
    know or one that belongs to another robot, and no params after `wait_s` seconds with none cached.
    An episode the service refuses later is logged as it happens and counted in the result.
    """
    spool = fleet.Spool(folder / "spool")
    puller = fleet.ParamsPuller(client, folder / "params.msgpack", poll_s=poll_s)
    uploader = fleet.Uploader(client, spool)
    check_identity(client, robot.robot_id, {"policy_version": puller.version, "spool_episodes": len(spool)})
    puller.start()
    uploader.start()
    records = []
    try:
        policy = first_policy(puller, wait_s)
        for k in range(episodes):
            clock = RateClock(hz)  # one per episode: its lateness and overruns are this episode's
            tic = time.perf_counter()
            episode = run_episode(robot, policy, clock=clock, replan=replan, seed=seed + k)
            wall = time.perf_counter() - tic
            spool_put(spool, episode)
            record = log_record(episode, wall, clock, len(spool))
            records.append(record)
            if log:
                with log.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            heartbeat(client, record, uploader, puller)
            policy = puller.policy  # swapped between episodes only: one version per episode
    finally:
        uploader.stop(drain_timeout=wait_s)
        puller.stop()
    return RunResult(records, {**uploader.stats, "spooled": len(spool)}, uploader.last_rejection)


def token_of(robot_id: str, token_file: pathlib.Path | None = None) -> str:
    """The robot's bearer token: its entry in `token_file` (JSON {robot_id: token}), else $JAXVLA_TOKEN."""
    if token_file:
        return json.loads(pathlib.Path(token_file).read_text())[robot_id]
    if "JAXVLA_TOKEN" in os.environ:
        return os.environ["JAXVLA_TOKEN"]
    raise SystemExit(f"{PROG}: pass --token-file or set JAXVLA_TOKEN")


def check_identity(client: fleet.FleetClient, robot_id: str, status: dict) -> None:
    """Exits, naming both ids, if the token is unknown or belongs to another robot (every episode would be
    refused). An unreachable service is not an error: the robot spools until it is back."""
    try:
        answer = client.heartbeat(status)
    except fleet.Refused as err:
        raise SystemExit(f"{PROG}: the service refuses this robot's token ({err})") from None
    except fleet.ServiceUnavailable as err:
        fleet.LOG.warning(
            "cannot check the token now (%s); episodes are spooled until the service is back", err
        )
        return
    owner = answer.get("robot_id")
    if owner is not None and owner != robot_id:
        raise SystemExit(
            f"{PROG}: the token belongs to robot {owner!r}, but this robot's id is {robot_id!r}; the "
            "service refuses episodes of another robot (pass the robot_id whose token you use)"
        )


def first_policy(puller: fleet.ParamsPuller, wait_s: float) -> Policy:
    """The policy to start with: the cached one at once if there is one (the puller swaps in a newer one
    between episodes), else the first one the service sends within `wait_s` seconds."""
    if puller.policy is None and not puller.swapped.wait(wait_s):
        raise SystemExit(f"{PROG}: no params after {wait_s:.0f} s ({puller.last_error})")
    return puller.policy


def spool_put(spool: fleet.Spool, episode: dict) -> None:
    """Spools an episode, waiting (never dropping it) while the spool is full."""
    body = wire.episodes_body([episode])
    while True:
        try:
            spool.put(episode["episode_metadata"]["episode_id"], body)
            return
        except fleet.SpoolFull:
            time.sleep(1.0)


def log_record(episode: dict, wall: float, clock: RateClock, spooled: int) -> dict:
    """One JSON line of the episode log: outcome, takeovers and this episode's loop timing."""
    meta, steps = episode["episode_metadata"], episode["steps"]
    return {
        "episode_id": meta["episode_id"],
        "robot_id": meta["robot_id"],
        "policy_version": int(meta["policy_version"]),
        "success": meta["success"],
        "takeover_steps": int(steps["is_intervention"].sum()),
        "steps": int(len(steps["is_first"])),
        "wall_s": wall,
        "spooled": spooled,
        "overruns": clock.overruns,
        **clock.percentiles(),
    }


def heartbeat(client: fleet.FleetClient, record: dict, uploader: fleet.Uploader, puller) -> None:
    status = {
        "policy_version": puller.version,
        "spool_episodes": record["spooled"],
        **uploader.stats,
        "loop_p99_ms": record["p99_ms"],
    }
    try:
        client.heartbeat(status)
    except (fleet.ServiceUnavailable, fleet.Refused):
        pass  # the uploader's backoff already handles an outage; a heartbeat is not worth waiting for


def summary(result: RunResult) -> str:
    """Success and takeovers per policy version as a table, then what the service did with the episodes."""
    by_version = collections.defaultdict(list)
    for r in result.records:
        by_version[r["policy_version"]].append(r)
    lines = ["| version | episodes | success | with takeover |", "|---:|---:|---:|---:|"]
    for version, rs in sorted(by_version.items()):
        wins = sum(r["success"] for r in rs)
        helped = sum(r["takeover_steps"] > 0 for r in rs)
        lines.append(f"| {version} | {len(rs)} | {wins / len(rs):.0%} ({wins}) | {helped} |")
    u = result.uploads
    lines.append(
        f"\nuploads: {u['pushed']} stored, {u['duplicates']} duplicates, {u['rejected']} rejected, "
        f"{u['spooled']} still spooled"
    )
    if result.last_rejection:
        lines.append(f"last rejection: {result.last_rejection} (the episodes are in <folder>/spool/rejected)")
    return "\n".join(lines)


def exit_status(result: RunResult) -> int:
    """1 if the service refused any episode (they are lost to the learner until someone looks), else 0."""
    return 1 if result.uploads["rejected"] else 0
