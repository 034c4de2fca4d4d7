"""Experiment configs: frozen dataclasses, a registry of named configs, and the tyro CLI over them.

A run starts from a named config (`get_config("debug")`, or `jaxvla <command> debug` on the command line)
and overrides fields by path (`--env.num-envs 8`). To add a config, append it to `_CONFIGS`; to add a
section (model, learner, ...), add a frozen dataclass and a field on `Config`. Field docstrings are the
CLI help. Modelled on openpi `training/config.py`.
"""

import dataclasses
import difflib
import typing
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Literal

import tyro

Split = Literal["train", "novel"]
SPLITS: tuple[str, ...] = typing.get_args(Split)


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """The simulated workcell: which task, which item distribution, how many copies at once."""

    task: str = "pick_place"
    """Registered task name in `envs/`."""
    split: Split = "train"
    """Item distribution: "train" (the pretraining one) or "novel" (heavier, porous, displaced, new)."""
    num_envs: int = 64
    """Environments stepped in parallel (the vmapped batch size)."""
    camera: bool = False
    """Add ray-cast camera images to the observations (slower)."""
    seed: int = 0
    """Seed of the root PRNG key that resets the environments."""

    def __post_init__(self) -> None:
        # Literal is only checked by tyro; configs built in Python are checked here.
        if self.split not in SPLITS:
            raise ValueError(f"EnvConfig.split must be one of {SPLITS}, got {self.split!r}")
        if self.num_envs < 1:
            raise ValueError(f"EnvConfig.num_envs must be at least 1, got {self.num_envs}")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment: a named starting point plus one section per part of the system."""

    name: str
    """Registry name; also names the run's output folder."""
    description: str
    """One line shown in `--help` next to the name."""
    env: EnvConfig
    """The simulated workcell."""
    out_dir: str = "runs"
    """Folder for checkpoints, logs and plots."""
    compile_cache: str = ".cache/jax"
    """Folder for JAX's persistent compilation cache, so reruns skip compiling."""


_CONFIGS = (
    Config(
        name="default",
        description="Full-size simulation run.",
        env=EnvConfig(num_envs=256),
    ),
    Config(
        name="debug",
        description="Tiny shapes, for tests and a first look; runs in seconds on a laptop CPU.",
        env=EnvConfig(num_envs=4),
    ),
)


def index_by_name(configs: Iterable[Config]) -> dict[str, Config]:
    """Maps name -> config; raises ValueError naming any duplicates."""
    by_name: dict[str, Config] = {}
    duplicates = []
    for config in configs:
        if config.name in by_name:
            duplicates.append(config.name)
        by_name[config.name] = config
    if duplicates:
        raise ValueError(f"Config names must be unique; duplicated: {sorted(set(duplicates))}")
    return by_name


# Built at import, so a duplicate name fails as soon as anything imports configs.
_CONFIGS_BY_NAME = index_by_name(_CONFIGS)


def list_configs() -> tuple[str, ...]:
    """Registered config names, in registry order."""
    return tuple(_CONFIGS_BY_NAME)


def get_config(name: str) -> Config:
    """The registered config called `name`; KeyError with the closest name as a suggestion otherwise."""
    if name in _CONFIGS_BY_NAME:
        return _CONFIGS_BY_NAME[name]
    close = difflib.get_close_matches(name, _CONFIGS_BY_NAME, n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"choose from: {', '.join(_CONFIGS_BY_NAME)}."
    raise KeyError(f"No config named {name!r}; {hint}")


def cli(argv: Sequence[str], prog: str | None = None) -> Config:
    """Parses `<config name> [--section.field value ...]` into a Config; exits with help on bad input."""
    choices = {config.name: (config.description, config) for config in _CONFIGS}
    return tyro.extras.overridable_config_cli(choices, prog=prog, args=argv)
