"""`jaxvla actor --url URL --token-file F --robot-id R [--operator] ...`: one robot of the fleet.

Runs episodes of the fleet's current policy on the C-MuJoCo twin (`--robot twin`) at `--hz` (0: as fast as
the simulator goes), through `jaxvla.actor.loop.run`, the loop a real arm runs from Python (subclass
`jaxvla.actor.robots.ArmTemplate`; docs/robot.md). Every episode is spooled to disk and pushed by a
background uploader; params are pulled in the background and swapped between episodes once verified. With
`--operator`, the scripted operator is the teleop device: it takes over at the first sign of failure (a
patch given at this robot). Writes one JSON line per episode to `--log` (version, success, takeover steps,
this episode's loop timing) and prints a summary. A token the service refuses, or one of another robot,
stops it before the first episode; an episode the service refuses later is logged when it happens,
counted in the summary, and makes the exit status 1. No jax: numpy, msgpack, the standard library, and
mujoco for the twin.
"""

import argparse
import os
import pathlib
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see jaxvla.actor: one thread is fastest at batch 1

from jaxvla.actor import client as fleet  # noqa: E402
from jaxvla.actor.loop import PROG  # noqa: E402
from jaxvla.actor.loop import exit_status  # noqa: E402
from jaxvla.actor.loop import run  # noqa: E402
from jaxvla.actor.loop import summary  # noqa: E402
from jaxvla.actor.loop import token_of  # noqa: E402


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8765", help="the fleet service")
    p.add_argument("--robot-id", required=True, help="this robot's id (its key in the tokens file)")
    p.add_argument("--token-file", type=pathlib.Path, help="JSON {robot_id: token}; or set JAXVLA_TOKEN")
    p.add_argument("--robot", default="twin", choices=["twin"], help="what to drive (arms: docs/robot.md)")
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


def main(argv: list[str]) -> int:
    args = parse(argv)
    from envs.operator import Trigger
    from envs.twin_robot import TwinRobot

    trigger = Trigger(disagreement=args.disagreement) if args.operator else None
    robot = TwinRobot(args.task, args.split, robot_id=args.robot_id, trigger=trigger)
    client = fleet.FleetClient(args.url, token_of(args.robot_id, args.token_file))
    folder = args.folder or pathlib.Path("runs/actor") / args.robot_id
    result = run(
        robot,
        client,
        folder,
        episodes=args.episodes,
        hz=args.hz,
        replan=args.replan,
        seed=args.seed,
        log=args.log,
    )
    print(f"{PROG} {args.robot_id}: {args.task}/{args.split}, operator {'on' if args.operator else 'off'}")
    print(summary(result))
    return exit_status(result)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
