"""The `jaxvla` command: `jaxvla <subcommand> [args...]` runs that subcommand module's `main(args)`.

Only the standard library is imported here, so the command works on a robot that has the base install
(numpy + msgpack). A subcommand's module, and whatever it needs, is imported only when it runs.
"""

import difflib
import importlib
import sys

# subcommand -> (module that defines `main(argv: list[str]) -> int`, one-line help)
SUBCOMMANDS = {
    "demo": ("tools.demo", "The main job: demonstrations, prior, fleet, then every method compared."),
    "sim": ("tools.sim", "Run the MJX workcell simulator and print what happened."),
    "bench": ("tools.bench.cli", "Time the simulator and learner; prints throughput ratios."),
    "twin": ("tools.twin", "Run an exported policy with the numpy client in the C-MuJoCo twin."),
    "data": ("tools.data", "Write demonstration datasets (RLDS) from the scripted operator."),
    "pretrain": ("tools.pretrain", "Train the foundation prior by behaviour cloning on demonstrations."),
    "export": ("tools.export", "Write a trained policy as one checksummed file for the numpy robot client."),
    "eval": ("tools.eval", "Evaluate a policy in MJX: success, failure modes, retries, cycle time."),
    "patch": ("tools.patch", "Patch the prior on deploy: operator takeovers, residual actor-critic; vs SFT."),
    "compare": ("tools.compare", "Patching runs side by side, on the same axes, with every seed."),
    "reach": ("tools.reach", "How much of the operator's takeovers a residual of each scale can express."),
    "retrain": ("tools.retrain", "The base a patching run's takeovers give, at several operator shares."),
    "pro": ("tools.pro", "Process-Reward Operator: collect logs, train, evaluate, compare rewards."),
    "recap": ("tools.recap", "Recap: advantage-conditioned retraining from rollouts and corrections."),
    "ript": ("tools.ript", "RIPT: group policy gradient from binary success, K rollouts per state."),
    "serve": ("tools.serve", "Run the fleet service (episodes in, gated params out) and its learner."),
    "publish": ("tools.publish", "Put an exported policy into the fleet's params (no learner needed)."),
    "actor": ("tools.actor", "Run one robot of the fleet: policy from the service, episodes pushed back."),
}

# The learner side: imported from a checkout (`pip install -e '.[learner]'`), never shipped in the wheel,
# which holds `jaxvla` alone (pyproject.toml). One of them missing means the install is not a checkout.
CHECKOUT_PACKAGES = frozenset({"learner", "envs", "configs", "tools"})
# This project's packages. A missing module outside them means an extra is not installed; a missing module
# inside them is a bug and is raised as is.
FIRST_PARTY = frozenset({"jaxvla"}) | CHECKOUT_PACKAGES

HELP_FLAGS = ("-h", "--help")


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    commands = [f"  {name:<{width}}  {help_line}" for name, (_, help_line) in SUBCOMMANDS.items()]
    footer = "Run `jaxvla <command> --help` for the command's options."
    return "\n".join(["usage: jaxvla <command> [args...]", "", "commands:", *commands, "", footer])


def unknown_command_message(command: str) -> str:
    close = difflib.get_close_matches(command, SUBCOMMANDS, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choose from: {', '.join(SUBCOMMANDS)}."
    return f"jaxvla: unknown command {command!r}; {hint}"


def missing_extra_message(command: str, missing_module: str) -> str:
    """One line: what is missing and the install command."""
    return (
        f"jaxvla {command} needs {missing_module!r} from the learner extras: pip install -e '.[learner]' "
        "in a checkout of the repository"
    )


def not_a_checkout_message(command: str, missing_package: str) -> str:
    """One line: the command belongs to the learner side, which only a checkout has."""
    return (
        f"jaxvla {command} runs from a checkout of the repository ({missing_package!r} is not installed: "
        "the jaxvla wheel is the robot client alone): pip install -e '.[learner]' in the checkout"
    )


def is_first_party(module_name: str) -> bool:
    return module_name.partition(".")[0] in FIRST_PARTY


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        # A missing command is a usage error (exit 2), but the list is what the user needs to see.
        print(usage(), file=sys.stderr)
        return 2
    command, command_args = argv[0], argv[1:]
    if command in HELP_FLAGS:
        print(usage())
        return 0
    if command not in SUBCOMMANDS:
        print(unknown_command_message(command), file=sys.stderr)
        return 2
    module_name, _ = SUBCOMMANDS[command]
    try:
        # A command may import what it needs only once it knows what to run (`jaxvla actor --robot
        # twin` needs mujoco), so the hint covers its run as well as its module's import.
        return importlib.import_module(module_name).main(command_args)
    except ModuleNotFoundError as err:
        if err.name in CHECKOUT_PACKAGES:  # the whole package, not a module inside it
            print(not_a_checkout_message(command, err.name), file=sys.stderr)
            return 2
        if err.name is None or is_first_party(err.name):
            raise
        print(missing_extra_message(command, err.name), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
