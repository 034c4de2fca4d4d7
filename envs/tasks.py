"""The three workcell tasks, their default configs and their `train` / `novel` splits.

Everything here is plain data, shared by the MJX env and the C-MuJoCo twin. A split is a set of ranges
that per-episode parameters are drawn from; `novel` holds the configurations a policy pretrained on
`train` has not seen: heavier and more porous items, a curved (capsule) part instead of a block, and
displaced target bins.
"""

import dataclasses
import difflib

import numpy as np

from jaxvla import tokenizer

SPLITS = ("train", "novel")
COLOURS = ("red", "green", "blue", "yellow")
COLOUR_RGBA = np.array(
    [[0.85, 0.15, 0.15, 1], [0.2, 0.7, 0.25, 1], [0.15, 0.3, 0.85, 1], [0.9, 0.8, 0.1, 1]], np.float32
)
MAX_BINS = 3


@dataclasses.dataclass(frozen=True)
class CellConfig:
    """Physics and control constants of the cell. Every task's `default_config()` returns one."""

    control_hz: float = 10.0
    """Policy steps per simulated second."""
    substeps: int = 10
    """Physics steps per control step."""
    solver_iterations: int = 10
    """CG iterations per physics step (the contact solve's accuracy against its cost)."""
    line_search_iterations: int = 8
    """Line-search iterations per CG iteration."""
    contact_timeconst: float = 0.03
    """Contact stiffness as a time constant [s] (MuJoCo solref); stable only above ~2 physics steps."""
    episode_seconds: float = 12.0
    """Time limit; reaching it truncates the episode."""
    v_max: float = 0.8
    """Gantry speed [m/s] commanded by a motion action of magnitude 1."""
    cup_radius: float = 0.02
    """Suction cup radius [m]; sets the cup area and the cup's collision sphere."""
    p_max_kpa: float = 70.0
    """Vacuum level [kPa below ambient] the ejector reaches on a perfect seal."""
    pump_tau: float = 0.08
    """Time constant [s] of vacuum build-up."""
    vent_tau: float = 0.05
    """Time constant [s] of vacuum release."""
    attach_fraction: float = 0.85
    """The grip is established once pressure reaches this fraction of its sealed steady state."""
    hold_kp: float = 900.0
    """Stiffness [1/s^2] of the cup-item coupling (per unit item mass)."""
    hold_kd: float = 60.0
    """Damping [1/s] of the cup-item coupling (per unit item mass)."""
    max_stretch: float = 0.012
    """The seal breaks once the item lags the cup by more than this [m]."""
    collision_force: float = 60.0
    """Wrist force [N] above which a contact counts as a collision."""
    obs_noise: float = 0.003
    """Std [m] of the vision system's item position estimate."""
    camera: bool = False
    """Add a ray-cast RGB-D image to the observation."""
    camera_res: int = 32
    """Image height and width in pixels."""

    @property
    def timestep(self) -> float:
        return 1.0 / (self.control_hz * self.substeps)

    @property
    def max_steps(self) -> int:
        return int(round(self.episode_seconds * self.control_hz))


@dataclasses.dataclass(frozen=True)
class SplitRanges:
    """Ranges that one split draws its per-episode parameters from (uniform unless stated)."""

    shape: str  # "box" or "capsule"; the geom type is fixed per split so MJX compiles one model
    mass: tuple[float, float]
    porosity: tuple[float, float]
    surface_seal: tuple[float, float]
    friction: tuple[float, float]
    half_size: tuple[tuple[float, float], ...]  # box: (hx, hy, hz); capsule: (radius, half length)
    bin_shift_x: tuple[float, float]
    bin_shift_y: tuple[float, float]


TRAIN = SplitRanges(
    shape="box",
    mass=(0.1, 0.6),
    porosity=(0.0, 0.15),
    surface_seal=(0.85, 1.0),
    friction=(0.6, 1.0),
    half_size=((0.025, 0.045), (0.025, 0.045), (0.02, 0.035)),
    bin_shift_x=(-0.02, 0.02),
    bin_shift_y=(-0.02, 0.02),
)
NOVEL = SplitRanges(
    shape="capsule",
    mass=(0.6, 1.5),
    porosity=(0.25, 0.45),
    surface_seal=(0.8, 1.0),
    friction=(0.4, 0.8),
    half_size=((0.025, 0.035), (0.02, 0.04)),
    bin_shift_x=(0.02, 0.1),
    bin_shift_y=(-0.14, 0.14),
)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What makes a task: its layout, its prompts and its stages."""

    name: str
    has_lid: bool
    bins: tuple[tuple[float, float, float, float], ...]  # nominal (cx, cy, hx, hy) of each target bin
    prompts: tuple[str, ...]  # indexed by colour * len(bins) + target bin
    stages: tuple[str, ...]
    default_config: CellConfig
    tote: tuple[float, float, float, float] = (0.0, 0.0, 0.14, 0.12)
    tote_wall: float = 0.10  # wall height [m]
    bin_wall: float = 0.08
    lid_mass: float = 0.3

    def ranges(self, split: str) -> SplitRanges:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return TRAIN if split == "train" else NOVEL

    def prompt_tokens(self) -> np.ndarray:
        """[len(prompts), PROMPT_LENGTH] int32 token table, indexed per episode."""
        return np.stack([tokenizer.encode(p) for p in self.prompts])

    @property
    def n_bins(self) -> int:
        return len(self.bins)


def _same_prompt_for_all(text: str, n_bins: int) -> tuple[str, ...]:
    return tuple(text for _ in range(len(COLOURS) * n_bins))


def _pick_place() -> TaskSpec:
    bins = ((0.45, 0.0, 0.11, 0.11),)
    return TaskSpec(
        name="pick_place",
        has_lid=False,
        bins=bins,
        prompts=_same_prompt_for_all("pick the part from the tote and place it in the bin", len(bins)),
        stages=("reach", "transport", "placed"),
        default_config=CellConfig(),
    )


def _sort() -> TaskSpec:
    bins = ((0.45, -0.22, 0.09, 0.1), (0.45, 0.0, 0.09, 0.1), (0.45, 0.22, 0.09, 0.1))
    prompts = tuple(f"put the {c} part in compartment {k + 1}" for c in COLOURS for k in range(len(bins)))
    return TaskSpec(
        name="sort",
        has_lid=False,
        bins=bins,
        prompts=prompts,
        stages=("reach", "transport", "placed"),
        default_config=CellConfig(),
    )


def _unbox() -> TaskSpec:
    bins = ((0.45, 0.0, 0.11, 0.11),)
    return TaskSpec(
        name="unbox",
        has_lid=True,
        bins=bins,
        prompts=_same_prompt_for_all("open the box lid then place the part in the bin", len(bins)),
        stages=("open_lid", "reach", "transport", "placed"),
        default_config=CellConfig(episode_seconds=20.0),
        tote=(0.0, 0.0, 0.11, 0.095),
        tote_wall=0.12,
    )


TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (_pick_place(), _sort(), _unbox())}


def get_task(name: str) -> TaskSpec:
    """The registered task `name`, with a "did you mean" for typos."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown task {name!r}{hint} (registered: {', '.join(TASKS)})")
    return TASKS[name]


def default_config(task: str) -> CellConfig:
    return get_task(task).default_config
