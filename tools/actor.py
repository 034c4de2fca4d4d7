"""`jaxvla actor --url URL --token-file F --robot-id R [--operator] ...`: one robot of the fleet.

Runs episodes of the fleet's current policy on a robot (`--robot twin`: the C-MuJoCo twin; on a real arm,
subclass `jaxvla.actor.robots.ArmTemplate` and call `run` from Python), at `--hz` (0: as fast as the
simulator goes). Every episode is spooled to disk and pushed by a background uploader; params are pulled
in the background and swapped between episodes once verified. With `--operator`, the scripted operator is
the teleop device: it takes over at the first sign of failure (a patch given at this robot). Writes one
JSON line per episode to `--log` (version, success, takeover steps, this episode's loop timing) and prints
a summary. A token the service refuses, or one of another robot, stops it before the first episode; an
episode the service refuses later is logged when it happens, counted in the summary, and makes the exit
status 1. No jax: numpy, msgpack, the standard library, and mujoco for the twin.
"""

import argparse
import collections
import json
import os
import pathlib
import sys
import time
from typing import NamedTuple

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see jaxvla.actor: one thread is fastest at batch 1

from jaxvla.actor import client as fleet  # noqa: E402
from jaxvla.actor import robots  # noqa: E402
from jaxvla.actor import wire  # noqa: E402
from jaxvla.actor.policy import Policy  # noqa: E402
from jaxvla.actor.runner import RateClock  # noqa: E402
from jaxvla.actor.runner import run_episode  # noqa: E402

PROG = "jaxvla actor"


class RunResult(NamedTuple):
    """What `run` did: one record per episode, and the uploader's counts at the end."""

    records: list[dict]
    uploads: dict  # pushed, duplicates, rejected (4xx: never stored), failures (retried), spooled (left)
    last_rejection: str | None  # the service's reason for the last refused episode


def run(robot: robots.RobotInterface, client: fleet.FleetClient, folder: pathlib.Path, *, episodes: int,
        hz: float, replan: int = 1, seed: int = 0, log: pathlib.Path | None = None,
        wait_s: float = 120.0, poll_s: float = 2.0) -> RunResult:  # fmt: skip
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
            record = episode_record(episode, wall, clock, len(spool))
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


def check_identity(client: fleet.FleetClient, robot_id: str, status: dict) -> None:
    """Exits, naming both ids, if the token is unknown or belongs to another robot (every episode would be
    refused). An unreachable service is not an error: the robot spools until it is back."""
    try:
        answer = client.heartbeat(status)
    except fleet.Refused as err:
        raise SystemExit(f"{PROG}: the service refuses this robot's token ({err})") from None
    except fleet.ServiceUnavailable as err:
        fleet.LOG.warning("cannot check the token now (%s); episodes are spooled until the service is back",
                          err)  # fmt: skip
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


def episode_record(episode: dict, wall: float, clock: RateClock, spooled: int) -> dict:
    meta, steps = episode["episode_metadata"], episode["steps"]
    return {"episode_id": meta["episode_id"], "robot_id": meta["robot_id"],
            "policy_version": int(meta["policy_version"]), "success": meta["success"],
            "takeover_steps": int(steps["is_intervention"].sum()), "steps": int(len(steps["is_first"])),
            "wall_s": wall, "spooled": spooled, "overruns": clock.overruns,
            **clock.percentiles()}  # fmt: skip


def heartbeat(client: fleet.FleetClient, record: dict, uploader: fleet.Uploader, puller) -> None:
    status = {"policy_version": puller.version, "spool_episodes": record["spooled"], **uploader.stats,
              "loop_p99_ms": record["p99_ms"]}  # fmt: skip
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
    lines.append(f"\nuploads: {u['pushed']} stored, {u['duplicates']} duplicates, {u['rejected']} rejected, "
                 f"{u['spooled']} still spooled")  # fmt: skip
    if result.last_rejection:
        lines.append(f"last rejection: {result.last_rejection} (the episodes are in <folder>/spool/rejected)")
    return "\n".join(lines)


def exit_status(result: RunResult) -> int:
    """1 if the service refused any episode (they are lost to the learner until someone looks), else 0."""
    return 1 if result.uploads["rejected"] else 0


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8765", help="the fleet service")
    p.add_argument("--robot-id", required=True, help="this robot's id (its key in the tokens file)")
    p.add_argument("--token-file", type=pathlib.Path, help="JSON {robot_id: token}; or set JAXVLA_TOKEN")
    p.add_argument("--robot", default="twin", choices=["twin"], help="what to drive (real arms: see README)")
    p.add_argument("--task", default="pick_place")
    p.add_argument("--split", default="novel")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--hz", type=float, default=0.0, help="control rate; 0 runs as fast as the simulator")
    p.add_argument("--replan", type=int, default=1, help="actions executed from each chunk before inferring")
    p.add_argument("--seed", type=int, default=0, help="episode k starts from seed + k")
    p.add_argument("--operator", action="store_true", help="the scripted operator takes over on failure")
    p.add_argument("--disagreement", type=float, default=1.0, help="operator trigger: action gap (0: off)")
    p.add_argument("--folder", type=pathlib.Path, help="spool and params cache (default runs/actor/<id>)")
    p.add_argument("--log", type=pathlib.Path, help="append one JSON line per episode here")
    args = p.parse_args(argv)
    if args.episodes < 1:
        p.error("--episodes must be at least 1")
    return args


def token_of(args: argparse.Namespace) -> str:
    if args.token_file:
        return json.loads(args.token_file.read_text())[args.robot_id]
    if "JAXVLA_TOKEN" in os.environ:
        return os.environ["JAXVLA_TOKEN"]
    raise SystemExit(f"{PROG}: pass --token-file or set JAXVLA_TOKEN")


def main(argv: list[str]) -> int:
    args = parse(argv)
    from envs.operator import Trigger
    from envs.twin_robot import TwinRobot

    trigger = Trigger(disagreement=args.disagreement) if args.operator else None
    robot = TwinRobot(args.task, args.split, robot_id=args.robot_id, trigger=trigger)
    client = fleet.FleetClient(args.url, token_of(args))
    folder = args.folder or pathlib.Path("runs/actor") / args.robot_id
    result = run(robot, client, folder, episodes=args.episodes, hz=args.hz, replan=args.replan,
                 seed=args.seed, log=args.log)  # fmt: skip
    print(f"{PROG} {args.robot_id}: {args.task}/{args.split}, operator {'on' if args.operator else 'off'}")
    print(summary(result))
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
