"""The three workcell tasks, their default configs and their `train` / `deploy` / `novel` splits.

Everything here is plain data, shared by the MJX env and the C-MuJoCo twin. A split is a mixture of
components, each a set of ranges that per-episode parameters are drawn from; every episode records which
component it came from.
- `train`: what the prior is pretrained on.
- `deploy`: the seeds' regime, a deployment the prior mostly handles. Most episodes are `train`-like; two
  tails each carry one specific, recoverable failure: heavy porous items that hold at the operator's
  careful accelerations but slip at the prior's (`physics`), and bins shifted past what training saw but
  inside reach (`layout`).
- `tail`: the deploy tails alone, in their deploy proportions (targeted SFT's demonstrations).
- `novel`: the stress split, six factors changed at once (a capsule, heavier and more porous, less
  friction, bins moved up to 14 cm). A prior trained on `train` fails all of it.
"""

import dataclasses
import difflib

import numpy as np

from jaxvla import tokenizer
from jaxvla.schema import SPLITS

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
    bin_shift_y_either_way: bool = False  # the y shift takes a random sign (|shift| in bin_shift_y)


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


# The deploy tails, calibrated against the default prior (docs/deploy.md has the table and the command).
PHYSICS_TAIL = dataclasses.replace(TRAIN, mass=(0.9, 1.4), porosity=(0.25, 0.4), surface_seal=(0.75, 0.9))
LAYOUT_TAIL = dataclasses.replace(
    TRAIN, bin_shift_x=(0.02, 0.06), bin_shift_y=(0.06, 0.10), bin_shift_y_either_way=True
)


@dataclasses.dataclass(frozen=True)
class Component:
    """One part of a split's mixture: its name, its share of episodes and its ranges."""

    name: str
    weight: float
    ranges: SplitRanges


@dataclasses.dataclass(frozen=True)
class Split:
    """A mixture of components drawn per episode. The item's geom type is compiled into the MJX model,
    so every component of a split shares one shape."""

    name: str
    components: tuple[Component, ...]

    def __post_init__(self) -> None:
        if len({c.ranges.shape for c in self.components}) != 1:
            raise ValueError(f"split {self.name!r}: every component must have the same item shape")
        if abs(sum(c.weight for c in self.components) - 1.0) > 1e-6:
            raise ValueError(f"split {self.name!r}: component weights must sum to 1")

    @property
    def component_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    @property
    def hull(self) -> SplitRanges:
        """Ranges covering every component: what the compiled model is sized for."""
        rs = [c.ranges for c in self.components]
        span = lambda pairs: (min(lo for lo, _ in pairs), max(hi for _, hi in pairs))  # noqa: E731
        scalar = ("mass", "porosity", "surface_seal", "friction", "bin_shift_x")
        fields = {name: span([getattr(r, name) for r in rs]) for name in scalar}
        y = [(-r.bin_shift_y[1], r.bin_shift_y[1]) if r.bin_shift_y_either_way else r.bin_shift_y for r in rs]
        half = tuple(span([r.half_size[i] for r in rs]) for i in range(len(rs[0].half_size)))
        return SplitRanges(shape=rs[0].shape, half_size=half, bin_shift_y=span(y), **fields)


SPLIT_MIXTURES = {
    "train": Split("train", (Component("train", 1.0, TRAIN),)),
    "deploy": Split(
        "deploy",
        (
            Component("train", 0.75, TRAIN),
            Component("physics", 0.125, PHYSICS_TAIL),
            Component("layout", 0.125, LAYOUT_TAIL),
        ),
    ),
    "tail": Split("tail", (Component("physics", 0.5, PHYSICS_TAIL), Component("layout", 0.5, LAYOUT_TAIL))),
    "novel": Split("novel", (Component("novel", 1.0, NOVEL),)),
}


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

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        return SPLIT_MIXTURES[name]

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
