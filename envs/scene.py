"""The workcell's MJCF, built from a task and a split, and the ids both simulators read it by.

Physical contacts are limited to the pairs that matter for picking: item-table, cup-item, cup-table and
cup-lid. Tote, box and bin walls are visual only; entering them is detected analytically (`cell.py`),
because box-box pairs dominate MJX's cost on a CPU (docs/mjx-on-cpu.md).

The solver is CG with a sparse Jacobian on purpose: with the default dense Newton path, MJX factors
matrices with LAPACK `potrf`, whose batched CPU kernel splits the batch over XLA's intra-op thread pool
and blocks on it. Two such kernels running at once on a 2-thread pool wait on each other forever, the
hang in docs/mjx-on-cpu.md at batch >= 256. CG + sparse compiles to no LAPACK call at all.

Warm start is off: it seeds CG with the last step's accelerations, which are stale for the actuated
gantry, and 6 iterations then leave resting items rocking (22 mm of drift). Starting from the
unconstrained accelerations makes the gantry's rows exact at once (1.3 mm, and faster). Ten iterations and
a 0.03 s contact time constant (3 physics steps) keep light items still: 6 iterations let 0.1 kg blocks
hop out of bins (88% operator success on pick_place/train against 100% now).
"""

import dataclasses

import mujoco
import numpy as np

from envs.tasks import COLOUR_RGBA
from envs.tasks import MAX_BINS
from envs.tasks import CellConfig
from envs.tasks import SplitRanges
from envs.tasks import TaskSpec

HOME = (0.2, 0.0, 0.3)  # gantry start position [m], clear of every wall
WORKSPACE_LO = (-0.35, -0.45, 0.0)
WORKSPACE_HI = (0.85, 0.45, 0.4)
LID_THICKNESS = 0.005
LID_CLEARANCE = 0.015  # [m] the lid counts as off once its edge is this far past the box opening
WALL_THICKNESS = 0.01


@dataclasses.dataclass(frozen=True)
class SceneIds:
    """Indices into the compiled model; identical for MJX and C MuJoCo."""

    gantry_body: int
    item_body: int
    item_geom: int
    lid_body: int  # -1 when the task has no lid
    bin_bodies: tuple[int, ...]
    gantry_dofs: tuple[int, int, int]
    item_qpos: int  # first of 7 free-joint coordinates
    item_dof: int  # first of 6 free-joint velocities (3 linear world-frame, 3 angular body-frame)
    lid_qpos: int
    lid_dof: int
    lid_origin: tuple[float, float, float]
    lid_half_length: float


def _box(name, pos, size, rgba, **attrs):
    extra = " ".join(f'{k}="{v}"' for k, v in attrs.items())
    p = " ".join(f"{v:.4f}" for v in pos)
    s = " ".join(f"{v:.4f}" for v in size)
    r = " ".join(f"{v:.3f}" for v in rgba)
    return f'<geom name="{name}" type="box" pos="{p}" size="{s}" rgba="{r}" {extra}/>'


def _walls(prefix, hx, hy, height, rgba):
    """Four visual wall slabs around a region centred on its body origin."""
    t = WALL_THICKNESS / 2
    vis = {"contype": 0, "conaffinity": 0, "group": 1}
    return "\n".join(
        [
            _box(f"{prefix}_px", (hx + t, 0, height / 2), (t, hy + 2 * t, height / 2), rgba, **vis),
            _box(f"{prefix}_nx", (-hx - t, 0, height / 2), (t, hy + 2 * t, height / 2), rgba, **vis),
            _box(f"{prefix}_py", (0, hy + t, height / 2), (hx + 2 * t, t, height / 2), rgba, **vis),
            _box(f"{prefix}_ny", (0, -hy - t, height / 2), (hx + 2 * t, t, height / 2), rgba, **vis),
        ]
    )


def _item_geom(ranges: SplitRanges) -> str:
    # Compiled at the largest size of the split so bounding radii stay conservative when the per-episode
    # size shrinks it (MuJoCo does not recompute geom_rbound from geom_size).
    contact = 'contype="1" conaffinity="1" condim="3"'
    if ranges.shape == "box":
        size = " ".join(f"{hi:.4f}" for _, hi in ranges.half_size)
        return f'<geom name="item" type="box" size="{size}" mass="0.3" rgba="0.8 0.2 0.2 1" {contact}/>'
    radius, half_len = (hi for _, hi in ranges.half_size)
    return (
        f'<geom name="item" type="capsule" size="{radius:.4f} {half_len:.4f}" euler="0 1.5707963 0" mass="0.3" '
        f'rgba="0.8 0.2 0.2 1" {contact}/>'
    )


def lid_origin(spec: TaskSpec) -> tuple[float, float, float]:
    """Centre of the closed lid's top face, where the cup grips it."""
    cx, cy, _, _ = spec.tote
    return (cx, cy, spec.tote_wall + 2 * LID_THICKNESS)


def lid_travel(spec: TaskSpec) -> float:
    """How far the lid must slide (towards -x) to uncover the whole box opening."""
    return 2 * spec.tote[2] + 0.01 + LID_CLEARANCE


def scene_xml(spec: TaskSpec, ranges: SplitRanges, config: CellConfig) -> str:
    """The MJCF string of one task and split. Same string for MJX and the C twin."""
    tcx, tcy, thx, thy = spec.tote
    bins = []
    for k, (cx, cy, hx, hy) in enumerate(spec.bins):
        rgba = COLOUR_RGBA[k % len(COLOUR_RGBA)] * np.array([0.5, 0.5, 0.5, 1.0]) + np.array([0.4] * 3 + [0])
        pad = _box(f"bin{k}_pad", (0, 0, 0.001), (hx, hy, 0.001), rgba, contype=0, conaffinity=0, group=1)
        bins.append(
            f'<body name="bin{k}" pos="{cx} {cy} 0">{pad}\n{_walls(f"bin{k}", hx, hy, spec.bin_wall, rgba)}</body>'
        )
    lid = ""
    if spec.has_lid:
        # A lid that slides off the box on rails (a joint, so it needs no supporting contacts); the rail
        # friction is what the cup's shear grip has to beat.
        top = lid_origin(spec)
        centre = " ".join(f"{v:.4f}" for v in (top[0], top[1], top[2] - LID_THICKNESS))
        lid = f"""
    <body name="lid" pos="{centre}">
      <joint name="lid_slide" type="slide" axis="-1 0 0" range="0 {lid_travel(spec) + 0.02:.4f}" limited="true" damping="4" frictionloss="1.5"/>
      {_box("lid", (0, 0, 0), (thx + 0.01, thy + 0.01, LID_THICKNESS), (0.55, 0.45, 0.3, 1), mass=spec.lid_mass, contype=4, conaffinity=2)}
    </body>"""
    wall_rgba = (0.45, 0.5, 0.55, 1)
    home = " ".join(str(v) for v in HOME)
    return f"""<mujoco model="jaxvla_{spec.name}">
  <compiler angle="radian"/>
  <option timestep="{config.timestep}" iterations="{config.solver_iterations}" ls_iterations="{config.line_search_iterations}" solver="CG" jacobian="sparse"/>
  <option><flag warmstart="disable"/></option>
  <default><geom solref="{config.contact_timeconst} 1"/></default>
  <visual><global offwidth="640" offheight="480"/></visual>
  <asset><material name="default" rgba="1 1 1 1"/></asset>
  <worldbody>
    <light pos="0.2 -0.3 1.5" dir="0 0.2 -1"/>
    <camera name="overview" pos="0.22 -0.8 0.75" xyaxes="1 0 0 0 0.68 0.73"/>
    <geom name="table" type="plane" size="1.2 1.2 0.05" rgba="0.82 0.82 0.78 1" contype="1" conaffinity="1"/>
    <body name="tote" pos="{tcx} {tcy} 0">
      {_box("tote_pad", (0, 0, 0.001), (thx, thy, 0.001), (0.5, 0.55, 0.6, 1), contype=0, conaffinity=0, group=1)}
      {_walls("tote", thx, thy, spec.tote_wall, wall_rgba)}
    </body>
    {"".join(bins)}
    <body name="gantry" pos="0 0 0" gravcomp="1">
      <joint name="gx" type="slide" axis="1 0 0" damping="190"/>
      <joint name="gy" type="slide" axis="0 1 0" damping="190"/>
      <joint name="gz" type="slide" axis="0 0 1" damping="190"/>
      <geom name="cup" type="sphere" size="{config.cup_radius}" mass="3" rgba="0.15 0.15 0.15 1" contype="2" conaffinity="1"/>
      <geom name="mast" type="capsule" fromto="0 0 0.03 0 0 0.5" size="0.012" mass="0" rgba="0.3 0.3 0.3 1" contype="0" conaffinity="0" group="1"/>
    </body>
    <body name="item" pos="{tcx} {tcy} 0.1">
      <freejoint name="item"/>
      {_item_geom(ranges)}
    </body>{lid}
  </worldbody>
  <actuator>
    <position name="ax" joint="gx" kp="3000"/>
    <position name="ay" joint="gy" kp="3000"/>
    <position name="az" joint="gz" kp="3000"/>
  </actuator>
  <keyframe><key name="home" qpos="{home} {tcx} {tcy} 0.1 1 0 0 0{" 0" if spec.has_lid else ""}" ctrl="{home}"/></keyframe>
</mujoco>"""


def compile_model(spec: TaskSpec, ranges: SplitRanges, config: CellConfig) -> tuple[mujoco.MjModel, SceneIds]:
    model = mujoco.MjModel.from_xml_string(scene_xml(spec, ranges, config))
    body = lambda name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, name)  # noqa: E731
    joint = lambda name: mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, name)  # noqa: E731
    lid = joint("lid_slide") if spec.has_lid else -1
    ids = SceneIds(
        gantry_body=body("gantry"),
        item_body=body("item"),
        item_geom=mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, "item"),
        lid_body=body("lid") if spec.has_lid else -1,
        bin_bodies=tuple(body(f"bin{k}") for k in range(spec.n_bins)),
        gantry_dofs=tuple(int(model.jnt_dofadr[joint(n)]) for n in ("gx", "gy", "gz")),
        item_qpos=int(model.jnt_qposadr[joint("item")]),
        item_dof=int(model.jnt_dofadr[joint("item")]),
        lid_qpos=int(model.jnt_qposadr[lid]) if lid >= 0 else -1,
        lid_dof=int(model.jnt_dofadr[lid]) if lid >= 0 else -1,
        lid_origin=lid_origin(spec),
        lid_half_length=spec.tote[2],
    )
    assert spec.n_bins <= MAX_BINS
    return model, ids


def item_base(
    model: mujoco.MjModel, ids: SceneIds, ranges: SplitRanges
) -> tuple[float, np.ndarray, np.ndarray]:
    """The item as compiled (largest size of the split): mass, inertia [3], half extents [3].

    Per-episode items rescale these (`cell.episode_model_values`).
    """
    if ranges.shape == "box":
        half = np.array([hi for _, hi in ranges.half_size])
    else:
        radius, half_len = (hi for _, hi in ranges.half_size)
        half = np.array([half_len + radius, radius, radius])
    mass = float(model.body_mass[ids.item_body])
    return mass, np.array(model.body_inertia[ids.item_body], np.float32), half
