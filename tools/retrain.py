"""`jaxvla retrain [config] --run RUN --shares S [S ...] [--target.field value ...]`: the base that a patching
run's takeovers give, at several operator shares of the BC batches.

For each seed in `target.seeds`, reads the takeover steps `jaxvla patch` saved in RUN/seed<N>/takeovers
(every round), retrains the prior by BC on them and the offline demonstrations with each share of every
batch drawn from the takeovers (`patch.operator_share`; 0: uniform over both), and scores the chunk
policy on the fixed test and validation contexts, by mixture component. It is how the share is chosen on
validation without a patching run per share.
"""

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

import configs
from learner import compile_cache
from learner import dataset
from learner import patch
from learner import pretrain

PROG = "jaxvla retrain"


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--run", type=pathlib.Path, required=True, help="a `jaxvla patch` run folder")
    parser.add_argument("--shares", type=float, nargs="+", required=True, help="operator shares in [0, 1)")
    args, rest = parser.parse_known_args(argv)
    if not all(0.0 <= share < 1.0 for share in args.shares):
        parser.error(f"every share must lie in [0, 1), got {args.shares}")
    return args, rest


def main(argv: list[str]) -> int:
    args, rest = parse(argv)
    config = configs.cli(rest, PROG, sections=("target", "patch", "pretrain"))
    compile_cache.enable(config.compile_cache)
    config, prior = pretrain.load_target(config, PROG)
    chunk = prior.model.chunk
    offline = patch.offline_demonstrations(config)
    offline_data = dataset.flatten(offline, chunk)
    evaluation = patch.paired_evaluation(config, prior)
    retrainers = {
        share: patch.Retrainer(
            dataclasses.replace(config, patch=dataclasses.replace(config.patch, operator_share=share)), prior
        )
        for share in args.shares
    }
    rows = []
    for seed in config.target.seeds:
        folder = args.run / f"seed{seed}" / "takeovers"
        rounds = len(list(folder.glob("round*.npz")))
        if not rounds:
            raise SystemExit(f"{PROG}: no takeovers saved in {folder}")
        takeovers = dataset.concatenate(*patch.saved_takeovers(folder, rounds))
        for share, retrain in retrainers.items():
            scored = evaluation(retrain(offline_data, takeovers, seed=seed))
            components = {k: v["success_rate"] for k, v in scored["by_component"].items()}
            rows.append({"seed": seed, "share": share, **scored, **components})
            print(f"seed {seed}, share {share:g}: {scored['success_rate']:.1%} on test", flush=True)
    names = list(rows[0]["by_component"])
    columns = ["success_rate", "validation_success", *names]
    print(f"\n{len(config.target.seeds)} seed(s), takeovers of {args.run}; mean (per seed) in %")
    print("| share | test | validation | " + " | ".join(names) + " |")
    print("|---:|" + "---|" * len(columns))
    for share in args.shares:
        mine = [r for r in rows if r["share"] == share]
        print(f"| {share:g} | " + " | ".join(cell([r[c] for r in mine]) for c in columns) + " |")
    return 0


def cell(rates: list[float | None]) -> str:
    """Mean (per seed) in %; a component without episodes in the contexts has no rate."""
    known = [r for r in rates if r is not None]
    if not known:
        return "-"
    return f"{100 * np.mean(known):.1f} ({', '.join('-' if r is None else f'{100 * r:.1f}' for r in rates)})"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
