"""Workcell formulas, written once against an array module `xp` (numpy or jax.numpy).

The MJX env (`workcell.py`) and the C-MuJoCo twin (`twin.py`) call these same functions on their own
arrays, so suction, telemetry, events, failure modes, reward and observations cannot drift apart. This
module imports neither jax nor mujoco. Everything is branch-free (`xp.where`) so it traces under jit.

Suction model. The ejector drives the vacuum level p [kPa] towards `p_max * seal * (1 - porosity)` with
time constant `pump_tau`; venting decays it with `vent_tau`. Seal quality comes from contact (the cup tip
within a few mm of the surface) and alignment (distance from the face centre, worse on a curved crest).
The grip is established once p reaches `attach_fraction` of its sealed level. While gripped, the cup
holds the item with a stiff mass-scaled spring-damper whose force is capped by the holding capacity:
normal load <= p*A and shear <= mu*p*A (an ellipse). Past the cap the item lags; once it lags more than
`max_stretch` the seal breaks: a slip (an established grip lost to load). A missed grasp is an attempt
that never sealed: the valve closed again with no grip.
"""

import dataclasses
from typing import Any
from typing import NamedTuple

import numpy as np

from envs import scene as _scene
from envs.tasks import MAX_BINS
from envs.tasks import CellConfig
from envs.tasks import Split
from envs.tasks import SplitRanges
from envs.tasks import TaskSpec
from jaxvla.schema import EVENTS as EVENTS  # re-exported: learner/pro.py and tools/pro.py read it here
from jaxvla.schema import FAILURE_MODES

GRAVITY = 9.81
NONE, DROP, SLIP, MISSED_GRASP, WRONG_BIN, COLLISION, TIMEOUT = range(len(FAILURE_MODES))
GRIP_NONE, GRIP_ITEM, GRIP_LID = 0, 1, 2
N_UNIFORMS = 12  # uniforms that `sample_params` maps onto one episode's parameters
N_OBS_NOISE = 6
REST_HEIGHT = 0.02  # an item whose bottom is below this [m] is on the table
REST_SPEED = 0.05  # ... and at rest below this speed [m/s]
SEAL_GAP = 0.006  # the cup tip seals when within this distance [m] of a surface
PRESSURE_SCALE = 1e3  # kPa -> Pa
WALL_TOLERANCE = 0.004  # [m] overlap with a wall below this is touching it, not striking it


@dataclasses.dataclass(frozen=True)
class State:
    """One env's state, the same for the MJX env (where it is a pytree) and the C twin."""

    data: Any  # mjx.Data, or the twin's mujoco.MjData
    obs: dict  # see `observe` (+ "image" [H, W, 4] when the camera is on)
    reward: Any  # [] sparse: 1.0 on the step the item comes to rest in the target bin
    done: Any  # [] terminal: success, drop, wrong bin or collision
    truncated: Any  # [] the time limit ended the episode
    info: dict  # telemetry, events, stage, failure mode, success, retries, cycle time (`finish_step`)
    params: "Params"
    cell: "Cell"
    key: Any  # the MJX env's PRNG key; the twin's numpy Generator


class Params(NamedTuple):
    """Per-episode parameters, drawn at reset and fixed for the episode."""

    item_half: Any  # [3] axis-aligned half extents [m]
    item_radius: Any  # [] capsule radius [m]; 0 for a block
    item_mass: Any  # [] kg
    item_friction: Any  # []
    surface_seal: Any  # [] 0..1, how well the surface seals when perfectly aligned
    porosity: Any  # [] 0..1, fraction of the vacuum lost through the material
    colour: Any  # [] int
    item_start: Any  # [3] initial item position
    bins: Any  # [MAX_BINS, 4] (cx, cy, hx, hy); hx = 0 marks an absent bin
    target: Any  # [] int, index of the target bin
    prompt: Any  # [PROMPT_LENGTH] int32 tokens
    p_max: Any  # [] kPa; a domain-randomisation knob
    pump_tau: Any  # [] s; a domain-randomisation knob
    obs_noise: Any  # [] m; a domain-randomisation knob
    component: Any  # [] int, which component of the split's mixture the episode came from


class Cell(NamedTuple):
    """The cell's own state beyond MuJoCo's: controller, vacuum system and episode bookkeeping."""

    setpoint: Any  # [3] gantry position setpoint (cup sphere centre)
    suction: Any  # [] 1.0 while the suction valve is commanded open
    pressure: Any  # [] kPa below ambient
    grip: Any  # [] GRIP_NONE | GRIP_ITEM | GRIP_LID
    seal: Any  # [] seal quality of the current grip
    attempt: Any  # [] a grasp attempt is open (valve opened, no grip yet)
    attempt_failed: Any  # [] the last attempt failed, so the next one is a retry
    retries: Any  # [] int
    failure_mode: Any  # [] int, see FAILURE_MODES
    had_failure: Any  # [] any failure event so far this episode
    success: Any  # []
    lid_open: Any  # [] latched; True for tasks without a lid
    step: Any  # [] int control steps since reset
    slip: Any  # [] largest load-to-hold ratio during the last control step
    wrist_force: Any  # [] largest wrist force [N] during the last control step


class Kin(NamedTuple):
    """What both simulators read from MuJoCo's data each physics step."""

    cup: Any  # [3] cup sphere centre
    cup_vel: Any  # [3]
    item_pos: Any  # [3]
    item_rot: Any  # [3, 3] body-to-world rotation
    item_vel: Any  # [3] world frame
    item_angvel: Any  # [3] body frame (MuJoCo's free-joint convention)
    lid_slide: Any  # [] m the lid has slid off the box, 0 = closed
    lid_rate: Any  # [] m/s
    constraint_force: Any  # [3] contact force on the gantry's three slide joints


class Flags(NamedTuple):
    """Events raised inside a control step (by any physics substep or by the action itself)."""

    grasp: Any
    release: Any
    slip: Any
    missed: Any
    collision: Any
    retry: Any


class Forces(NamedTuple):
    item: Any  # [6] force and torque applied at the item's centre of mass (xfrc_applied row)
    lid: Any  # [6]
    gantry: Any  # [6] the reaction on the cup


@dataclasses.dataclass(frozen=True)
class Layout:
    """Task constants the formulas need, as plain numbers (static under jit)."""

    has_lid: bool
    n_bins: int
    tote: tuple[float, float, float, float]
    tote_wall: float
    bin_wall: float
    lid_origin: tuple[float, float, float]
    lid_travel: float
    lid_mass: float
    max_steps: int
    stage_base: int  # stages before "reach": 1 with a lid to open, else 0

    @classmethod
    def create(cls, spec: TaskSpec, config: CellConfig) -> "Layout":
        return cls(
            has_lid=spec.has_lid,
            n_bins=spec.n_bins,
            tote=spec.tote,
            tote_wall=spec.tote_wall,
            bin_wall=spec.bin_wall,
            lid_origin=_scene.lid_origin(spec),
            lid_travel=_scene.lid_travel(spec),
            lid_mass=spec.lid_mass,
            max_steps=config.max_steps,
            stage_base=1 if spec.has_lid else 0,
        )


def _f32(xp, value):
    # Explicit float32 everywhere: weakly typed Python floats would make jit retrace.
    return xp.asarray(value, dtype=xp.float32)


def _lerp(lo_hi, u):
    lo, hi = lo_hi
    return lo + (hi - lo) * u


def nominal_bins(spec: TaskSpec) -> np.ndarray:
    """[MAX_BINS, 4] the task's bins, zero-padded."""
    bins = np.zeros((MAX_BINS, 4), np.float32)
    bins[: spec.n_bins] = spec.bins
    return bins


# ---------------------------------------------------------------------------------------------- reset
def sample_params(xp, u, spec: TaskSpec, split: Split, config: CellConfig, prompts, u_component) -> Params:
    """Maps uniforms `u` [N_UNIFORMS] in [0, 1) onto one episode of the component that `u_component` [] in
    [0, 1) picks by weight; each backend supplies its own uniforms."""
    component = _pick_component(xp, split, u_component)
    pick = lambda get: _component_range(xp, split, get, component)  # noqa: E731
    if split.hull.shape == "box":
        half = xp.stack([_lerp(pick(lambda r, i=i: r.half_size[i]), u[i]) for i in range(3)])
        radius = _f32(xp, 0.0)
    else:  # a capsule lying along x: radius R, half length L
        radius = _lerp(pick(lambda r: r.half_size[0]), u[0])
        length = _lerp(pick(lambda r: r.half_size[1]), u[1])
        half = xp.stack([length + radius, radius, radius])
    tcx, tcy, thx, thy = spec.tote
    margin = 0.015
    start = xp.stack(
        [
            tcx + (2 * u[3] - 1) * (thx - half[0] - margin),
            tcy + (2 * u[4] - 1) * (thy - half[1] - margin),
            half[2] + 0.001,
        ]
    )
    colour = xp.minimum((u[9] * 4).astype(xp.int32), 3)
    target = xp.minimum((u[10] * spec.n_bins).astype(xp.int32), spec.n_bins - 1)
    nominal = nominal_bins(spec)
    valid = (nominal[:, 2] > 0).astype(np.float32)
    # Either way: the first half of u[2] shifts towards -y, the second towards +y, each over the range.
    either_way = pick(lambda r: (r.bin_shift_y_either_way,) * 2)[0] > 0.5
    u_y = xp.where(either_way, (2 * u[2]) % 1.0, u[2])
    sign = xp.where(either_way & (u[2] < 0.5), -1.0, 1.0)
    shift_y = sign * _lerp(pick(lambda r: r.bin_shift_y), u_y)
    shift = xp.stack([_lerp(pick(lambda r: r.bin_shift_x), u[11]), shift_y, 0 * u[2], 0 * u[2]])
    return Params(
        item_half=_f32(xp, half),
        item_radius=_f32(xp, radius),
        item_mass=_f32(xp, _lerp(pick(lambda r: r.mass), u[5])),
        item_friction=_f32(xp, _lerp(pick(lambda r: r.friction), u[6])),
        surface_seal=_f32(xp, _lerp(pick(lambda r: r.surface_seal), u[7])),
        porosity=_f32(xp, _lerp(pick(lambda r: r.porosity), u[8])),
        colour=colour,
        item_start=_f32(xp, start),
        bins=_f32(xp, nominal + valid[:, None] * shift[None, :]),
        target=target,
        prompt=prompts[colour * spec.n_bins + target],
        p_max=_f32(xp, config.p_max_kpa),
        pump_tau=_f32(xp, config.pump_tau),
        obs_noise=_f32(xp, config.obs_noise),
        component=component,
    )


def _pick_component(xp, split: Split, u_component):
    """[] int32: the component whose cumulative-weight interval holds `u_component`."""
    upper = np.cumsum([c.weight for c in split.components])[:-1].astype(np.float32)
    return xp.sum(xp.asarray(u_component) >= upper).astype(xp.int32)


def _component_range(xp, split: Split, get, component):
    """(lo, hi) of the range `get(ranges)` in the episode's component; plain floats for one component."""
    pairs = [get(c.ranges) for c in split.components]
    if len(pairs) == 1:
        return pairs[0]
    table = np.asarray(pairs, np.float32)  # [components, 2]
    return xp.asarray(table[:, 0])[component], xp.asarray(table[:, 1])[component]


def initial_cell(xp, layout: Layout) -> Cell:
    zero, false = _f32(xp, 0.0), xp.asarray(False)
    return Cell(
        setpoint=_f32(xp, _scene.HOME),
        suction=zero,
        pressure=zero,
        grip=xp.asarray(GRIP_NONE, dtype=xp.int32),
        seal=zero,
        attempt=false,
        attempt_failed=false,
        retries=xp.asarray(0, dtype=xp.int32),
        failure_mode=xp.asarray(NONE, dtype=xp.int32),
        had_failure=false,
        success=false,
        lid_open=xp.asarray(not layout.has_lid),
        step=xp.asarray(0, dtype=xp.int32),
        slip=zero,
        wrist_force=zero,
    )


def episode_model_values(xp, params: Params, ranges: SplitRanges, base_mass, base_inertia, base_half):
    """Per-episode values of the item's model fields: (mass, inertia[3], geom_size[3], friction[3])."""
    if ranges.shape == "box":
        size = params.item_half
    else:
        size = xp.stack(
            [params.item_radius, params.item_half[0] - params.item_radius, 0 * params.item_radius]
        )
    # Scales the compiled inertia (its principal frame is kept) by mass and squared mean size.
    scale = params.item_mass / base_mass * (xp.mean(params.item_half) / np.mean(base_half)) ** 2
    friction = xp.stack([params.item_friction, _f32(xp, 0.005), _f32(xp, 0.0001)])
    return params.item_mass, base_inertia * scale, size, friction


# ------------------------------------------------------------------------------------------ geometry
def read_kin(xp, data, ids: _scene.SceneIds) -> Kin:
    """Reads an `mjx.Data` or a `mujoco.MjData` alike (only indexing is used)."""
    g = np.asarray(ids.gantry_dofs)
    i = ids.item_dof
    has_lid = ids.lid_qpos >= 0
    zero = data.qpos[0] * 0
    return Kin(
        cup=data.xpos[ids.gantry_body],
        cup_vel=data.qvel[g],
        item_pos=data.xpos[ids.item_body],
        item_rot=xp.reshape(data.xmat[ids.item_body], (3, 3)),
        item_vel=data.qvel[i : i + 3],
        item_angvel=data.qvel[i + 3 : i + 6],
        lid_slide=data.qpos[ids.lid_qpos] if has_lid else zero,
        lid_rate=data.qvel[ids.lid_dof] if has_lid else zero,
        constraint_force=data.qfrc_constraint[g],
    )


def cup_tip(xp, kin: Kin, config: CellConfig):
    return kin.cup - _f32(xp, [0.0, 0.0, config.cup_radius])


def item_vertical_half(xp, kin: Kin, params: Params):
    """Half of the item's current vertical extent (a tilted block stands taller)."""
    return xp.sum(xp.abs(kin.item_rot[2]) * params.item_half)


def item_top(xp, kin: Kin, params: Params):
    return kin.item_pos + xp.stack(
        [0 * kin.item_pos[0], 0 * kin.item_pos[0], item_vertical_half(xp, kin, params)]
    )


def lid_handle(xp, layout: Layout, slide, rate):
    """The lid's suction point (its top-face centre) after sliding `slide` [m]: position, velocity [3]."""
    x, y, z = layout.lid_origin
    zero = 0 * slide
    return xp.stack([x - slide, y + zero, z + zero]), xp.stack([-rate, zero, zero])


def item_seal(xp, kin: Kin, params: Params, config: CellConfig):
    """Seal quality 0..1 the cup would get on the item where it is now."""
    rel = cup_tip(xp, kin, config) - item_top(xp, kin, params)
    local = kin.item_rot[:, :2].T @ rel  # lateral offset in the item's own x/y axes
    dx, dy = local[0], local[1]
    contact = (rel[2] < SEAL_GAP) & (rel[2] > -0.01)
    hx, hy = params.item_half[0], params.item_half[1]
    box_align = 1 - (dx / hx) ** 2 - (dy / hy) ** 2
    # A capsule only seals on its crest line, and a cup wider than the crest's curvature leaks.
    radius = xp.maximum(params.item_radius, 1e-3)
    crest = 1 - 0.5 * (config.cup_radius / radius) ** 2
    capsule_align = (1 - (dx / hx) ** 2 - (dy / (0.6 * radius)) ** 2) * crest
    align = xp.clip(xp.where(params.item_radius > 0, capsule_align, box_align), 0.0, 1.0)
    return params.surface_seal * align * contact


def lid_seal(xp, kin: Kin, layout: Layout, config: CellConfig):
    handle, _ = lid_handle(xp, layout, kin.lid_slide, kin.lid_rate)
    rel = cup_tip(xp, kin, config) - handle
    contact = (rel[2] < SEAL_GAP) & (rel[2] > -0.01)
    return xp.clip(1 - (rel[0] ** 2 + rel[1] ** 2) / 0.03**2, 0.0, 1.0) * contact


def regions(xp, params: Params, layout: Layout):
    """[1 + MAX_BINS, 4] tote then bins, as (cx, cy, hx, hy); and their wall heights."""
    tote = _f32(xp, layout.tote)[None, :]
    heights = np.array([layout.tote_wall] + [layout.bin_wall] * MAX_BINS, np.float32)
    return xp.concatenate([tote, params.bins], axis=0), heights


def hits_wall(xp, centre, half, params: Params, layout: Layout):
    """Whether an axis-aligned box (centre [3], half [3]) overlaps any wall slab."""
    boxes, heights = regions(xp, params, layout)
    t = _scene.WALL_THICKNESS / 2
    cx, cy, hx, hy = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    zc = _f32(xp, heights / 2)
    one = xp.ones_like(cx)
    slab_centre = xp.concatenate(
        [
            xp.stack([cx + hx + t, cy, zc], -1),
            xp.stack([cx - hx - t, cy, zc], -1),
            xp.stack([cx, cy + hy + t, zc], -1),
            xp.stack([cx, cy - hy - t, zc], -1),
        ]
    )
    slab_half = xp.concatenate(
        [
            xp.stack([t * one, hy + 2 * t, zc], -1),
            xp.stack([t * one, hy + 2 * t, zc], -1),
            xp.stack([hx + 2 * t, t * one, zc], -1),
            xp.stack([hx + 2 * t, t * one, zc], -1),
        ]
    )
    present = xp.concatenate([hx > 0] * 4)
    reach = half[None, :] + slab_half - WALL_TOLERANCE
    overlap = xp.all(xp.abs(centre[None, :] - slab_centre) < reach, axis=-1)
    return xp.any(overlap & present)


def inside_regions(xp, xy, boxes):
    """[R] whether the point `xy` lies inside each (cx, cy, hx, hy) region; absent ones (hx = 0) never."""
    return (xp.abs(xy[None, :] - boxes[:, :2]) < boxes[:, 2:]).all(axis=-1) & (boxes[:, 2] > 0)


# -------------------------------------------------------------------------------------------- step
def apply_action(xp, cell: Cell, action, config: CellConfig):
    """Turns an action [dx, dy, dz, suction] in [-1, 1] into a setpoint and valve command.

    Returns the updated cell, the setpoint at the start of the step (substeps interpolate from it, so the
    gantry follows a ramp rather than a jump) and the flags the valve edge raises.
    """
    a = xp.clip(action, -1.0, 1.0)
    lo = _f32(xp, [_scene.WORKSPACE_LO[0], _scene.WORKSPACE_LO[1], config.cup_radius])
    hi = _f32(xp, _scene.WORKSPACE_HI)
    setpoint = xp.clip(cell.setpoint + a[:3] * (config.v_max / config.control_hz), lo, hi)
    on = a[3] > 0
    was_on = cell.suction > 0.5
    rising, falling = on & ~was_on, ~on & was_on
    missed = falling & cell.attempt & (cell.grip == GRIP_NONE)
    retry = rising & cell.attempt_failed
    cell = cell._replace(
        setpoint=_f32(xp, setpoint),
        suction=_f32(xp, on),
        attempt=xp.where(rising, True, xp.where(falling, False, cell.attempt)),
        attempt_failed=xp.where(retry, False, cell.attempt_failed | missed),
        retries=cell.retries + retry.astype(xp.int32),
        slip=_f32(xp, 0.0),
        wrist_force=_f32(xp, 0.0),
    )
    false = xp.asarray(False)
    return cell, xp.asarray(cell.setpoint), Flags(false, false, false, missed, false, retry)


def substep(xp, cell: Cell, kin: Kin, params: Params, layout: Layout, config: CellConfig):
    """One physics substep of the vacuum system and cup-item coupling: (cell, forces to apply, flags)."""
    dt = _f32(xp, config.timestep)
    top = item_top(xp, kin, params)
    handle, handle_vel = lid_handle(xp, layout, kin.lid_slide, kin.lid_rate)
    seal_item = item_seal(xp, kin, params, config)
    seal_lid = lid_seal(xp, kin, layout, config) * (~cell.lid_open) if layout.has_lid else 0 * seal_item

    # Vacuum: which surface the cup is on, and the level that surface lets the ejector reach.
    on = cell.suction > 0.5
    free = cell.grip == GRIP_NONE
    candidate = xp.where(seal_lid > seal_item, GRIP_LID, GRIP_ITEM)
    seal = xp.where(free, xp.maximum(seal_item, seal_lid), cell.seal)
    on_lid = xp.where(free, candidate, cell.grip) == GRIP_LID
    sealed_level = params.p_max * seal * (1 - xp.where(on_lid, 0.0, params.porosity))
    level = xp.where(on, sealed_level, 0.0)
    tau = xp.where(on, params.pump_tau, config.vent_tau)
    pressure = level + (cell.pressure - level) * xp.exp(-dt / tau)
    attach = on & free & (seal > 0.05) & (level > 1.0) & (pressure >= config.attach_fraction * level)
    grip = xp.where(attach, candidate, cell.grip)

    # Coupling: a mass-scaled spring-damper from the cup tip to the gripped point, capped by the hold.
    is_lid, held = grip == GRIP_LID, grip != GRIP_NONE
    anchor = xp.where(is_lid, handle, top)
    anchor_vel = xp.where(is_lid, handle_vel, kin.item_vel)
    mass = xp.where(is_lid, layout.lid_mass, params.item_mass)
    err, derr = cup_tip(xp, kin, config) - anchor, kin.cup_vel - anchor_vel
    lift = xp.where(is_lid, 0.0, GRAVITY)  # the lid's rails carry its weight
    want = mass * (config.hold_kp * err + config.hold_kd * derr) + mass * xp.stack([0 * lift, 0 * lift, lift])
    hold = pressure * PRESSURE_SCALE * (np.pi * config.cup_radius**2)
    mu = xp.where(is_lid, 0.8, params.item_friction)
    shear = xp.sqrt(want[0] ** 2 + want[1] ** 2 + 1e-12)
    load = xp.sqrt(xp.maximum(want[2], 0.0) ** 2 + (shear / mu) ** 2) / xp.maximum(hold, 1e-6)
    force = want / xp.maximum(load, 1.0)

    stretch = xp.sqrt(xp.sum(err**2))
    broken = held & (stretch > config.max_stretch)
    released = held & ~on
    detached = broken | released
    force = xp.where(held & ~detached, force, 0.0)
    item_force = xp.where(is_lid, 0.0, force)
    lid_force = xp.where(is_lid, force, 0.0)
    # Rotational damping while held: a cup pressed on a face resists the item spinning about it.
    spin = xp.where(held & ~detached & ~is_lid, -0.05 * params.item_mass, 0.0) * (
        kin.item_rot @ kin.item_angvel
    )
    wrist = xp.sqrt(xp.sum((kin.constraint_force - force) ** 2))
    cup_half = _f32(xp, [config.cup_radius] * 3)
    carried = held & ~is_lid
    collided = (
        hits_wall(xp, kin.cup, cup_half, params, layout)
        | (carried & hits_wall(xp, kin.item_pos, params.item_half, params, layout))
        | (wrist > config.collision_force)
    )

    failed = broken  # a broken seal ends the attempt as a failure; a grip ends it as a success
    cell = cell._replace(
        pressure=_f32(xp, pressure),
        grip=xp.where(detached, GRIP_NONE, grip).astype(xp.int32),
        seal=_f32(xp, xp.where(detached, 0.0, seal)),
        attempt=cell.attempt & ~attach & ~failed,
        attempt_failed=cell.attempt_failed | failed,
        slip=xp.maximum(cell.slip, xp.where(held, load, 0.0)),
        wrist_force=xp.maximum(cell.wrist_force, wrist),
    )
    zero3 = 0 * force
    forces = Forces(
        item=_f32(xp, xp.concatenate([item_force, spin])),
        lid=_f32(xp, xp.concatenate([lid_force, zero3])),
        gantry=_f32(xp, xp.concatenate([-force, zero3])),
    )
    flags = Flags(
        grasp=attach,
        release=released,
        slip=broken,
        missed=xp.asarray(False),
        collision=collided,
        retry=xp.asarray(False),
    )
    return cell, forces, flags


def no_flags(xp) -> Flags:
    false = xp.asarray(False)
    return Flags(false, false, false, false, false, false)


def merge_flags(xp, a: Flags, b: Flags) -> Flags:
    return Flags(*(xp.logical_or(x, y) for x, y in zip(a, b, strict=True)))


def finish_step(xp, cell: Cell, kin: Kin, params: Params, flags: Flags, layout: Layout, config: CellConfig):
    """Outcome of a control step: (cell, reward, done, truncated, info)."""
    boxes, _ = regions(xp, params, layout)
    xy = kin.item_pos[:2]
    inside = inside_regions(xp, xy, boxes)
    in_tote, in_bin = inside[0], inside[1:]
    target = xp.arange(MAX_BINS) == params.target
    speed = xp.sqrt(xp.sum(kin.item_vel**2))
    bottom = kin.item_pos[2] - item_vertical_half(xp, kin, params)
    loose = cell.grip != GRIP_ITEM
    on_table = loose & (bottom < REST_HEIGHT)
    at_rest = on_table & (speed < REST_SPEED)
    lid_open = cell.lid_open | (kin.lid_slide > layout.lid_travel)

    success = at_rest & xp.any(in_bin & target) & lid_open
    wrong_bin = at_rest & xp.any(in_bin & ~target)
    drop = on_table & ~in_tote & ~xp.any(in_bin)
    collision = flags.collision
    done = success | wrong_bin | drop | collision
    step = cell.step + 1
    truncated = (step >= layout.max_steps) & ~done

    mode = cell.failure_mode
    causes = (
        (flags.missed, MISSED_GRASP),
        (flags.slip, SLIP),
        (drop, DROP),
        (wrong_bin, WRONG_BIN),
        (collision, COLLISION),
    )
    for event, code in causes:  # later, more serious causes override earlier ones
        mode = xp.where(event, code, mode)
    mode = xp.where(success, NONE, mode)
    mode = xp.where(truncated & (mode == NONE), TIMEOUT, mode)
    failed = flags.missed | flags.slip | drop | wrong_bin | collision

    stage = xp.where(
        lid_open, layout.stage_base + xp.where(success, 2, xp.where(cell.grip == GRIP_ITEM, 1, 0)), 0
    )
    cell = cell._replace(
        failure_mode=mode.astype(xp.int32),
        had_failure=cell.had_failure | failed,
        success=success,
        lid_open=lid_open,
        step=step.astype(xp.int32),
    )
    # In the order of jaxvla.schema.EVENTS.
    events = xp.stack([flags.grasp, flags.release, flags.slip, drop, flags.retry, collision, flags.missed])
    info = {
        "pressure": cell.pressure,
        "contact_force": cell.wrist_force,
        "slip": cell.slip,
        "events": events,
        "stage": stage.astype(xp.int32),
        "failure_mode": cell.failure_mode,
        "success": success,
        "retries": cell.retries,
        "cycle_time": _f32(xp, step / config.control_hz),
        "had_failure": cell.had_failure,
    }
    return cell, _f32(xp, success), done, truncated, info


def observe(xp, kin: Kin, cell: Cell, params: Params, noise, layout: Layout, config: CellConfig) -> dict:
    """The policy's observation; `noise` [N_OBS_NOISE] are standard normals from the backend's RNG."""
    lid = xp.clip(kin.lid_slide / layout.lid_travel, 0.0, 1.0) if layout.has_lid else kin.lid_slide * 0 + 1
    bins = xp.concatenate([params.bins[:, :2], (params.bins[:, 2:3] > 0).astype(xp.float32)], axis=1)
    return {
        "proprio": _f32(xp, xp.concatenate([kin.cup, kin.cup_vel, cell.suction[None]])),
        "telemetry": _f32(
            xp,
            xp.stack([cell.pressure / config.p_max_kpa, cell.wrist_force / 50.0, xp.minimum(cell.slip, 3.0)]),
        ),
        "item": _f32(
            xp,
            xp.concatenate(
                [kin.item_pos + params.obs_noise * noise[:3], params.item_half + 0.002 * noise[3:]]
            ),
        ),
        "scene": _f32(xp, xp.concatenate([xp.reshape(bins, (-1,)), lid[None]])),
        "prompt": params.prompt,
    }
