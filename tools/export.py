"""`jaxvla export --policy RUN [--out DIR] [--version N] [--parent N]`: the robot's policy file.

Writes the latest checkpoint's policy of a training run as one checksummed file (arrays + JSON manifest,
`jaxvla/export.py`) that `jaxvla.actor.load` runs with numpy alone. The version defaults to the
checkpoint's training step.
"""

import argparse
import pathlib

from jaxvla import export
from learner import pretrain


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jaxvla export", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, type=pathlib.Path, help="run folder with checkpoints/")
    parser.add_argument("--out", type=pathlib.Path, help="folder for the file (default: RUN/export)")
    parser.add_argument("--version", type=int, help="params version (default: the checkpoint's step)")
    parser.add_argument("--parent", type=int, help="version these params were fine-tuned from")
    args = parser.parse_args(argv)
    if not (args.policy / "checkpoints").is_dir():
        parser.error(f"{args.policy} has no checkpoints/ folder; pass a `jaxvla pretrain` run folder")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    prior = pretrain.load(args.policy)
    out = args.out or args.policy / "export"
    out.mkdir(parents=True, exist_ok=True)
    path = export.write(
        out,
        prior.model,
        prior.params,
        prior.stats,
        version=prior.step if args.version is None else args.version,
        parent_version=args.parent,
        config_hash=prior.config_hash,
        extra={"run": str(args.policy), "step": prior.step},
    )
    manifest = export.read_manifest(path)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), version {manifest['version']}, "
        f"sha256 {manifest['sha256'][:16]}…"
    )
    return 0
