"""The fleet's learner process (`jaxvla serve` starts and supervises it; runnable alone with the same
arguments): ingests the episode store into replay, patches with SAC, gates and publishes params."""

import sys

import configs
from learner import compile_cache
from learner.fleet.loop import FleetLearner
from tools.serve import SECTIONS


def main(argv: list[str]) -> int:
    config = configs.cli(argv, "jaxvla serve (learner)", sections=SECTIONS)
    compile_cache.enable(config.compile_cache)
    learner = FleetLearner(config)
    print(f"learner: round {learner.learner.round}, cursor {learner.cursor}", flush=True)
    learner.run(config.fleet.rounds, config.fleet.poll_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
