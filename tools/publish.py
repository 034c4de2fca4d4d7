"""`jaxvla publish FILE [--root runs/fleet] [--gate sim ...]`: put an exported policy into the fleet's params.

For a fleet served without a learner (`jaxvla serve --fleet.no-learner`), or to roll out a policy trained
elsewhere: robots pull it at their next manifest poll. The file must run on a robot (format, checksums and
manifest verified as `jaxvla.actor.loads` does) and carry a version above the latest published one
(`jaxvla export --version N`). With `--gate NAME` it is first scored against the latest published version
by that regression gate (`learner.fleet.gate.GATES`; "sim": success in the C-MuJoCo twin on held-out episodes)
and published only if it passes; without, it is published as given (its gate verdict says "manual").
The registry has one writer at a time: do not publish into a root whose learner is running.
"""

import argparse
import dataclasses
import pathlib
import sys

from jaxvla.actor import fileformat
from jaxvla.actor import policy as actor_policy
from learner.fleet.store import ParamsRegistry

PROG = "jaxvla publish"


class NotPublished(Exception):
    """The file was refused: it does not verify, its version is not new, or the gate failed it."""


def publish(registry: ParamsRegistry, data: bytes, gate=None) -> dict:
    """Publishes `data` as the latest version and returns its registry entry; NotPublished naming why not.

    `gate` (a `learner.fleet.gate.Gate` or None) compares the file with the latest published one; the first
    version has nothing to be compared with and is published ungated.
    """
    try:
        version = actor_policy.loads(data).version
    except fileformat.PolicyFileError as err:
        raise NotPublished(f"the file is not a policy a robot can run: {err}") from None
    current = registry.latest()
    if current is not None and version <= current["version"]:
        raise NotPublished(
            f"the file holds version {version}, not above the published {current['version']}; "
            "export it with `jaxvla export --version N` for a larger N"
        )
    verdict = {"manual": True}
    if gate is not None and current is not None:
        verdict = {**gate.check(data, registry.read(current["version"])), **verdict}
        if not verdict["passed"]:
            raise NotPublished(
                f"the gate refused version {version}: score {verdict['candidate']:.3f} "
                f"against {verdict['current']:.3f} for version {current['version']}, margin "
                f"{verdict['margin']}"
            )
    return registry.publish(data, verdict)


def make_gate(args: argparse.Namespace):
    """The gate `--gate` names over the fleet config's defaults, with the options given; None without."""
    if not args.gate:
        return None
    import configs
    from learner.fleet import gate as gates

    def given(section, **fields):
        return dataclasses.replace(section, **{k: v for k, v in fields.items() if v is not None})

    fleet = given(
        configs.FleetConfig(), gate=args.gate, gate_episodes=args.gate_episodes, gate_margin=args.gate_margin
    )
    return gates.make_gate(fleet, given(configs.TargetConfig(), task=args.task, split=args.split))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("file", type=pathlib.Path, help="an exported policy file (`jaxvla export`)")
    p.add_argument(
        "--root",
        type=pathlib.Path,
        default=pathlib.Path("runs/fleet"),
        help="the fleet's folder (serve's --fleet.root); the registry is ROOT/params",
    )
    p.add_argument("--gate", default="", help="score against the published version first (e.g. sim)")
    p.add_argument("--task", help="the gate's task (default: the target config's)")
    p.add_argument("--split", help="the gate's item distribution (default: the target config's)")
    p.add_argument("--gate-episodes", type=int, help="the gate's held-out episodes")
    p.add_argument("--gate-margin", type=float, help="how much lower a candidate may score and pass")
    args = p.parse_args(argv)
    if not args.file.is_file():
        p.error(f"{args.file} is not a file")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    registry = ParamsRegistry(args.root / "params")
    try:
        entry = publish(registry, args.file.read_bytes(), make_gate(args))
    except NotPublished as err:
        print(f"{PROG}: not published: {err}", file=sys.stderr)
        return 1
    print(f"{PROG}: version {entry['version']} is the latest in {registry.root} (gate {entry['gate']})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
