"""Any gymnasium environment as one robot of the jaxvla fleet: the fleet's policy acts, episodes go back.

    jaxvla serve default --fleet.no-learner           # or with a learner; writes runs/fleet/tokens.json
    jaxvla publish runs/default/export/policy-v*.msgpack
    python examples/gym_robot.py --env Pendulum-v1 --robot-id robot-0 --token-file runs/fleet/tokens.json

The robot needs the base install (numpy, msgpack) and gymnasium, nothing from the learner. The part a new
robot writes is `connect` below: which robot it is, the goal prompt, how its observation maps onto the
schema's fields (docs/robot.md: proprio, telemetry, item, scene, with their units and frames), how the
policy's 4 actions ([dx, dy, dz, suction] in [-1, 1]) map onto its action, and which `info` key says
the task succeeded. Everything else (params pull, spool, upload, rate, start-up checks) is
`jaxvla.actor.loop.run`.

For an environment it knows nothing about, this example packs the flattened observation (a Box or a Dict,
nested or not) into the schema's float fields in order, and drives the first actions of a Box. That makes
any environment's episodes land in the store, but a policy trained on the workcell reads those fields with
their documented meaning: for it to act sensibly, map your sensors field by field instead.
"""

import argparse
import os
import pathlib
import sys

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # see jaxvla.actor: one thread is fastest at batch 1

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402

from jaxvla import schema  # noqa: E402
from jaxvla.actor import loop  # noqa: E402
from jaxvla.actor.client import FleetClient  # noqa: E402
from jaxvla.actor.robots import GymRobot  # noqa: E402

FIELDS = ("proprio", "telemetry", "item", "scene")  # the schema's float fields; the robot adds the prompt
SIZES = [schema.OBSERVATION_SPEC[name].shape[0] for name in FIELDS]


def flat(obs) -> np.ndarray:
    """A Box or (nested) Dict observation as one float32 vector, Dict keys in sorted order."""
    if isinstance(obs, dict):
        return np.concatenate([flat(obs[key]) for key in sorted(obs)])
    return np.ravel(np.asarray(obs, np.float32))


def packed(obs) -> dict:
    """The flattened observation in the schema's float fields, in order, zero-padded."""
    values = flat(obs)
    if values.size > sum(SIZES):
        raise ValueError(f"the observation has {values.size} values; the schema's fields hold {sum(SIZES)}")
    padded = np.zeros(sum(SIZES), np.float32)
    padded[: values.size] = values
    return dict(zip(FIELDS, np.split(padded, np.cumsum(SIZES)[:-1]), strict=True))


def first_actions(space):
    """An action_fn for a Box: the policy's actions drive its first entries, scaled onto their bounds
    (unbounded ones as [-1, 1]); the others stay at the middle of their range."""
    low, high = (np.ravel(np.asarray(b, np.float32)) for b in (space.low, space.high))
    bounded = np.isfinite(low) & np.isfinite(high)
    centre = np.where(bounded, (low + high) / 2, 0.0).astype(np.float32)
    half = np.where(bounded, (high - low) / 2, 1.0).astype(np.float32)
    n = min(schema.ACTION_SIZE, centre.size)

    def action_fn(action: np.ndarray) -> np.ndarray:
        command = centre.copy()
        command[:n] += half[:n] * np.clip(np.asarray(action, np.float32)[:n], -1.0, 1.0)
        return command.reshape(space.shape)

    return action_fn


def connect(env, args: argparse.Namespace) -> GymRobot:
    """What a new robot writes: its id, its goal, its observation and action mappings, its success key."""
    return GymRobot(
        env,
        robot_id=args.robot_id,
        task=args.task,
        prompt=args.prompt,
        control_hz=args.hz or 10.0,
        observation_fn=packed,
        action_fn=first_actions(env.action_space),
        success=args.success_key or None,
    )


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--env",
        required=True,
        help="a gymnasium id, e.g. Pendulum-v1; MODULE:ID imports MODULE "
        "first (gym_hil:gym_hil/PandaPickCubeBase-v0)",
    )
    p.add_argument("--url", default="http://127.0.0.1:8765", help="the fleet service")
    p.add_argument("--robot-id", required=True, help="this robot's id (its key in the tokens file)")
    p.add_argument("--token-file", type=pathlib.Path, help="JSON {robot_id: token}; or set JAXVLA_TOKEN")
    p.add_argument("--task", default="pick_place", help="the task name recorded with each episode")
    p.add_argument("--prompt", default="pick the part from the tote and place it in the bin")
    p.add_argument("--success-key", default="", help="the info key that says the task succeeded")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--hz", type=float, default=10.0, help="control rate; 0 runs as fast as the env goes")
    p.add_argument("--folder", type=pathlib.Path, help="spool and params cache (default runs/actor/<id>)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    env = gym.make(args.env)
    client = FleetClient(args.url, loop.token_of(args.robot_id, args.token_file))
    folder = args.folder or pathlib.Path("runs/actor") / args.robot_id
    result = loop.run(connect(env, args), client, folder, episodes=args.episodes, hz=args.hz)
    print(loop.summary(result))
    return loop.exit_status(result)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
