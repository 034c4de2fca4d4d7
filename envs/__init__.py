"""The MJX workcell simulator, its tasks and the C-MuJoCo twin.

`make("sort", "novel")` builds a jittable env; `TASKS` names the registered tasks. This module imports
neither jax nor mujoco, so `envs.twin` stays usable on a robot-side machine without jax.
"""

import dataclasses

from envs.tasks import SPLITS
from envs.tasks import TASKS
from envs.tasks import CellConfig
from envs.tasks import default_config
from envs.tasks import get_task

__all__ = ["SPLITS", "TASKS", "CellConfig", "default_config", "make"]


def make(task: str, split: str = "train", **overrides):
    """The MJX `Workcell` for `task` on `split`, with `CellConfig` fields overridden by keyword."""
    from envs.workcell import Workcell

    config = dataclasses.replace(get_task(task).default_config, **overrides)
    return Workcell(task, split, config)
