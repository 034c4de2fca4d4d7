"""The scripted operator: demonstrations, takeovers and outcome labels.

`act` is a pure function of the (privileged) simulator state, with no memory of its own, so the
operator can take over from any mid-episode state, recover, complete and hand control back. It reads
the true item mass and the measured vacuum to pick a safe acceleration: the thing a pretrained policy
gets wrong on heavy, porous items. Written against `xp` like `cell.py`, so the MJX env, the C twin and
(as the teleop device in simulation) the robot client all drive the same operator.
"""

import dataclasses

import numpy as np

from envs import cell as C
from envs.tasks import CellConfig
from jaxvla import schema

LID_LEAD = 0.05  # [m] how far ahead of the lid the cup leads it
ALIGN_TOL = 0.004  # [m] lateral error at which the cup starts its descent
HOLD_TOL = 0.008  # [m] lateral error up to which an open valve stays open
NEAR = 0.02  # [m] lateral error within which the cup centres without climbing first
EMPTY_SPEED, EMPTY_ACCEL = 0.7, 4.0  # [m/s], [m/s^2] with nothing held
LID_SPEED, LID_ACCEL = 0.3, 2.0  # [m/s], [m/s^2] while dragging the lid off
HOLD_MARGIN = 0.6  # use at most this fraction of the holding capacity


def waypoint(xp, kin: C.Kin, cell: C.Cell, params: C.Params, layout: C.Layout, config: CellConfig):
    """Where the cup tip should go next [3] and whether the valve should be open."""
    tip = C.cup_tip(xp, kin, config)
    planned = cell.setpoint - xp.asarray([0.0, 0.0, config.cup_radius], dtype=xp.float32)
    top = C.item_top(xp, kin, params)
    wall = max(layout.tote_wall, layout.bin_wall)
    travel = wall + 0.04  # empty cup travels above every wall
    carry = wall + 2 * C.item_vertical_half(xp, kin, params) + 0.03  # ... and so does a held item's bottom
    grip = cell.grip

    # Held item: rise, cross over the target, lower, let go just above the bin floor.
    goal = params.bins[params.target]
    over_target = xp.sqrt(xp.sum((kin.item_pos[:2] - goal[:2]) ** 2)) < 0.008
    bottom = kin.item_pos[2] - C.item_vertical_half(xp, kin, params)
    offset = tip[:2] - kin.item_pos[:2]  # keep the grasp offset when centring the item over the bin
    place = xp.concatenate([goal[:2] + offset, (tip[2] - bottom + 0.008)[None]])
    cross = xp.concatenate([goal[:2] + offset, carry[None]])
    rise = xp.concatenate([planned[:2], carry[None]])
    high = planned[2] > carry - 0.01
    held_wp = xp.where(over_target, place, xp.where(high, cross, rise))
    held_valve = ~(over_target & (bottom < 0.012))

    # Free cup: travel above the walls, centre over the grasp point, descend, open the valve on contact.
    lid_needed = ~cell.lid_open
    if layout.has_lid:
        handle, _ = C.lid_handle(xp, layout, kin.lid_slide * 0, kin.lid_rate * 0)
        grasp_point = xp.where(lid_needed, handle, top)
    else:
        grasp_point = top
    lateral = xp.sqrt(xp.sum((planned[:2] - grasp_point[:2]) ** 2))
    low = planned[2] < travel - 0.02
    in_target = C.inside_regions(xp, kin.item_pos[:2], params.bins)[params.target]
    near = lateral <= NEAR
    above = xp.concatenate([grasp_point[:2], xp.maximum(travel, grasp_point[2] + 0.05)[None]])
    # Close but not centred: centre at the current height. Climbing back to `above` here made the cup
    # bob up and down around the alignment tolerance, a chatter that cloned policies average into a stall.
    hover = xp.concatenate([grasp_point[:2], xp.maximum(planned[2], grasp_point[2] + 0.012)[None]])
    lift_out = xp.concatenate([planned[:2], xp.asarray([travel], dtype=xp.float32)])
    off_centre = xp.where(near, hover, xp.where(low, lift_out, above))
    free_wp = xp.where(lateral > ALIGN_TOL, off_centre, grasp_point)
    # Hysteresis: an open valve stays open while the cup is still near the grasp point, so a millimetre
    # of drift across the tolerance does not close it mid-attempt (a missed grasp and a retry).
    tolerance = xp.where(cell.suction > 0.5, HOLD_TOL, ALIGN_TOL)
    free_valve = (lateral <= tolerance) & (tip[2] - grasp_point[2] < 0.012)
    # Placed (or resting in the target after a release): back off upwards and keep the valve shut.
    done_wp = lift_out
    free_wp = xp.where(in_target & ~lid_needed, done_wp, free_wp)
    free_valve = free_valve & ~(in_target & ~lid_needed)

    # Held lid: drag it off the box, let go once the opening is clear.
    if layout.has_lid:
        lid_wp, _ = C.lid_handle(xp, layout, kin.lid_slide + LID_LEAD, kin.lid_rate * 0)
        lid_valve = kin.lid_slide < layout.lid_travel + 0.004
    else:
        lid_wp, lid_valve = free_wp, free_valve

    wp = xp.where(grip == C.GRIP_ITEM, held_wp, xp.where(grip == C.GRIP_LID, lid_wp, free_wp))
    valve = xp.where(grip == C.GRIP_ITEM, held_valve, xp.where(grip == C.GRIP_LID, lid_valve, free_valve))
    return wp, valve


def safe_motion(xp, cell: C.Cell, params: C.Params, config: CellConfig):
    """Speed [m/s] and acceleration [m/s^2] limits that keep the held load within the holding capacity."""
    hold = HOLD_MARGIN * cell.pressure * C.PRESSURE_SCALE * (np.pi * config.cup_radius**2)
    vertical = hold / params.item_mass - C.GRAVITY
    lateral = params.item_friction * hold / params.item_mass
    accel = xp.clip(xp.minimum(vertical, 0.5 * lateral), 0.3, EMPTY_ACCEL)
    speed = xp.clip(0.15 + 0.12 * accel, 0.15, EMPTY_SPEED)
    held, lid = cell.grip == C.GRIP_ITEM, cell.grip == C.GRIP_LID
    speed = xp.where(held, speed, xp.where(lid, LID_SPEED, EMPTY_SPEED))
    return speed, xp.where(held, accel, xp.where(lid, LID_ACCEL, EMPTY_ACCEL))


def act(xp, kin: C.Kin, cell: C.Cell, params: C.Params, layout: C.Layout, config: CellConfig):
    """The operator's action [4] in the env's action space: motion in units of `v_max`, then the valve."""
    wp, valve = waypoint(xp, kin, cell, params, layout, config)
    planned = cell.setpoint - xp.asarray([0.0, 0.0, config.cup_radius], dtype=xp.float32)
    speed_limit, accel = safe_motion(xp, cell, params, config)
    dt = 1.0 / config.control_hz
    err = wp - planned
    dist = xp.sqrt(xp.sum(err**2)) + 1e-9
    # Fast enough to arrive, slow enough to stop in the remaining distance, never past it in one step.
    speed = xp.minimum(xp.minimum(speed_limit, xp.sqrt(2 * accel * dist) * 0.9), dist / dt)
    desired = err / dist * speed
    change = desired - kin.cup_vel
    change_norm = xp.sqrt(xp.sum(change**2)) + 1e-9
    velocity = kin.cup_vel + change * xp.minimum(1.0, accel * dt / change_norm)
    # Settle exactly on the waypoint once within one step of it.
    velocity = xp.where(dist < speed_limit * dt, err / dt, velocity)
    motion = xp.clip(velocity / config.v_max, -1.0, 1.0)
    return xp.concatenate([motion, xp.where(valve, 1.0, -1.0)[None]]).astype(xp.float32)


def label(info: dict) -> dict:
    """The operator's verdict on a finished episode, from its last step's info (any array type)."""
    mode = int(np.asarray(info["failure_mode"]))
    return {
        "success": bool(np.asarray(info["success"])),
        "failure_mode": schema.FAILURE_MODES[mode],
        "retries": int(np.asarray(info["retries"])),
        "cycle_time": float(np.asarray(info["cycle_time"])),
        "operator_reward": float(bool(np.asarray(info["success"]))),
    }


# ------------------------------------------------------------------------------------------ takeover
@dataclasses.dataclass(frozen=True)
class Trigger:
    """When the operator takes over, and when control goes back.

    By default the operator reacts to signs of failure, as the seeds' operators do: an imminent slip, a
    wrist force, a failure event, a stall. A takeover is a segment: control returns once the situation has
    been calm for `calm_steps` (no alarm, and a held load back under `calm_slip` of the hold: hysteresis, so
    a heavy item is not handed back mid-lift) or at `max_segment` steps, so a takeover during transport does
    not keep control to the end of the episode.
    """

    slip: float = 0.85
    """Load-to-hold ratio at which a slip is judged imminent."""
    force: float = 45.0
    """Wrist force [N] judged a near collision."""
    on_failure_event: bool = True
    """Take over after any missed grasp or slip event."""
    stall_steps: int = 30
    """Take over when the task stage has not advanced for this many control steps (a stuck robot)."""
    disagreement: float = 0.0
    """Take over when the policy's motion differs from the operator's by more than this in any axis
    (0: off). Off by default: it measures style, not failure. The valve is left out of the gap, since a
    one-step difference in valve timing alone is a gap of 2."""
    lookahead: int = 0
    """Shadow-roll the policy this many steps ahead in simulation and take over just before a predicted
    failure (0: off). Needs a Takeover built with the policy (`envs.wrappers.Takeover(policy=...)`)."""
    hand_back: bool = True
    """Return control at all (False: the operator finishes every episode it takes over)."""
    calm_steps: int = 5
    """Calm steps after which the operator hands back."""
    calm_slip: float = 0.5
    """A step is calm only with the load-to-hold ratio under this."""
    max_segment: int = 40
    """The longest takeover segment [control steps]."""


def takeover_start(xp) -> dict:
    """The takeover bookkeeping at the start of an episode (see `takeover_flags`)."""
    false, zero = xp.asarray(False), xp.asarray(0, dtype=xp.int32)
    return {
        "intervening": false,
        "is_intervention": false,
        "stalled_for": zero,
        "segment_steps": zero,
        "calm_for": zero,
    }


def takeover_alarm(xp, trigger: Trigger, info: dict, policy_action, operator_action, predicted_failure=False):
    """Whether the operator sees a reason to take over this step. `info` carries the env's telemetry plus
    the bookkeeping of `takeover_flags`; `predicted_failure` is the look-ahead's verdict."""
    events = info["events"]  # grasp, release, slip, drop, retry, collision, missed grasp
    failing = (events[2] | events[6]) & trigger.on_failure_event
    stalled = info["stalled_for"] >= trigger.stall_steps
    gap = xp.max(xp.abs(policy_action[:3] - operator_action[:3]))
    disagrees = (trigger.disagreement > 0) & (gap > trigger.disagreement)
    warning = (info["slip"] > trigger.slip) | (info["contact_force"] > trigger.force) | stalled | disagrees
    return warning | failing | predicted_failure


def takeover_flags(xp, trigger: Trigger, info: dict, alarm, new_stage, new_done) -> dict:
    """The bookkeeping after a step: `intervening` (still in control), `is_intervention` (the operator's
    action ran this step), the length of the current segment, the calm steps within it and the steps
    without task progress."""
    start = alarm & ~info["intervening"]
    active = info["intervening"] | alarm
    segment_steps = xp.where(start, 1, xp.where(active, info["segment_steps"] + 1, 0))
    calm = active & ~alarm & (info["slip"] < trigger.calm_slip)
    calm_for = xp.where(calm, info["calm_for"] + 1, 0)
    settled = (calm_for >= trigger.calm_steps) | (segment_steps >= trigger.max_segment)
    handed_back = trigger.hand_back & active & settled & ~new_done
    progressed = new_stage != info["stage"]
    return {
        "intervening": active & ~handed_back,
        "is_intervention": active,
        "stalled_for": xp.where(progressed | start, 0, info["stalled_for"] + 1).astype(xp.int32),
        "segment_steps": xp.where(handed_back, 0, segment_steps).astype(xp.int32),
        "calm_for": xp.where(handed_back, 0, calm_for).astype(xp.int32),
    }
