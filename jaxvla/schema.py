"""The episode schema and its checks, with numpy alone: the robot validates what it records with the same
tables and functions the service and the RLDS writer (`jaxvla.episodes`) use.

Three tables: OBSERVATION_SPEC (what a robot observes each step), STEP_SPEC (the rest of a step) and
METADATA_SPEC (one per episode). Units and frames of every field are in docs/robot.md. `check_episode`
names the first field of a whole episode that breaks the schema; `check_observation` does the same for
one observation, so a robot can refuse a bad sensor mapping before its first step rather than after the
service rejects the episode. The names that index a step's fields (FAILURE_MODES, EVENTS), the data
sources and splits, and the policy's advantage-indicator values are defined here too, once, for the
simulator, the learner and the robot alike. Standard library and numpy only.
"""

import math
import uuid
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

SOURCES = ("offline", "online", "patch")  # where an episode came from: replay keeps one buffer per source
# Item distributions of the workcell (envs/tasks.py says what each one draws).
SPLITS = ("train", "deploy", "tail", "novel")
# A step's `failure_mode` indexes FAILURE_MODES (0: none so far); its `events` flag EVENTS, one bool each.
# envs/cell.py computes both, in the MJX env and in the C-MuJoCo twin.
FAILURE_MODES = ("none", "drop", "slip", "missed_grasp", "wrong_bin", "collision", "timeout")
EVENTS = ("grasp", "release", "slip", "drop", "retry", "collision", "missed_grasp")
N_FAILURE_MODES, N_EVENTS = len(FAILURE_MODES), len(EVENTS)
# Recap's advantage indicator, an input of advantage-conditioned policies: NONE is what indicator dropout
# and unconditioned inference feed, so classifier-free guidance contrasts against it.
INDICATOR_NONE, INDICATOR_POSITIVE, INDICATOR_NEGATIVE = 0, 1, 2
INDICATOR_VALUES = 3  # rows of the policy's indicator embedding
PROMPT_LENGTH = 12  # token ids per goal prompt (jaxvla.tokenizer pads or cuts to it)


class Spec(NamedTuple):
    """One field: its shape per step (or per episode, for metadata), its dtype, and what it means."""

    shape: tuple[int, ...]
    dtype: type  # a numpy scalar type, or `str` for text
    doc: str


OBSERVATION_SPEC: dict[str, Spec] = {
    "proprio": Spec((7,), np.float32, "cup position [m] (3), cup velocity [m/s] (3), suction command"),
    "telemetry": Spec((3,), np.float32, "vacuum / p_max, wrist force / 50 N, slip ratio (load / hold, <= 3)"),
    "item": Spec((6,), np.float32, "estimated item position [m] (3, noisy), item half size [m] (3)"),
    "scene": Spec((10,), np.float32, "per target bin (x, y, present) [m] (3 x 3), lid open fraction"),
    "prompt": Spec((PROMPT_LENGTH,), np.int32, "goal prompt token ids (jaxvla.tokenizer), PAD-filled"),
}
# The float observation vectors a policy's state encoder reads, in the order it concatenates them.
STATE_KEYS = ("proprio", "telemetry", "item", "scene")
STATE_SIZE = sum(OBSERVATION_SPEC[key].shape[0] for key in STATE_KEYS)

STEP_SPEC: dict[str, Spec] = {
    "action": Spec((4,), np.float32, "command sent to the robot: [dx, dy, dz, suction] in [-1, 1]"),
    "policy_action": Spec((4,), np.float32, "the policy's proposal (differs from action under intervention)"),
    "reward": Spec((), np.float32, "reward of this transition"),
    "discount": Spec((), np.float32, "0 on a terminal transition, else 1"),
    "is_first": Spec((), np.bool_, "first step of the episode"),
    "is_last": Spec((), np.bool_, "last step of the episode (terminal or truncated)"),
    "is_terminal": Spec((), np.bool_, "this transition ended the episode in a terminal state"),
    "is_intervention": Spec((), np.bool_, "a human or scripted operator chose the action"),
    "failure_mode": Spec((), np.int32, "failure so far, an index into FAILURE_MODES (0: none)"),
    "events": Spec((N_EVENTS,), np.bool_, "events of this step, one flag per name in EVENTS"),
}

METADATA_SPEC: dict[str, Spec] = {
    "episode_id": Spec((), str, "uuid4; the idempotency key of the episode"),
    "robot_id": Spec((), str, "robot (or simulator) that recorded it"),
    "task": Spec((), str, "registered task name"),
    "prompt": Spec((), str, "goal prompt as text"),
    "policy_version": Spec((), str, "params version that acted, or 'operator'"),
    "source": Spec((), str, f"one of {', '.join(SOURCES)}"),
    "success": Spec((), np.bool_, "the task was completed"),
    "operator_reward": Spec((), np.float32, "the operator's outcome label (1 success, 0 failure)"),
    "retries": Spec((), np.int32, "grasp retries in the episode"),
    "cycle_time": Spec((), np.float32, "episode duration [s]"),
}

ACTION_SIZE = STEP_SPEC["action"].shape[0]

# numpy dtype kinds a robot's value may have for each schema dtype; anything else cannot be converted
# without losing meaning (a text prompt, a float where token ids belong).
_CONVERTIBLE_KINDS = {np.float32: "iuf", np.int32: "iu", np.bool_: "b"}


def describe(spec: Spec) -> str:
    """`float32[7]`: the dtype and shape a field must have."""
    return f"{np.dtype(spec.dtype).name}{list(spec.shape)}"


# ---------------------------------------------------------------------------------------- observation
def check_observation(obs, spec: dict[str, Spec] = OBSERVATION_SPEC) -> None:
    """Raises ValueError naming the first field of one observation (a dict of arrays, no time axis) that
    the schema would refuse: a missing or unexpected key, a shape, a dtype that does not convert, or a
    non-finite value."""
    if not isinstance(obs, dict):
        raise ValueError(f"an observation must be a dict of arrays, got {type(obs).__name__}")
    missing, extra = sorted(set(spec) - set(obs)), sorted(set(obs) - set(spec))
    if missing or extra:
        wanted = ", ".join(f"{k} {describe(s)}" for k, s in spec.items())
        raise ValueError(
            f"observation: missing fields {missing}, unexpected fields {extra}; the schema is "
            f"{{{wanted}}} (docs/robot.md)"
        )
    for name, field in spec.items():
        value = np.asarray(obs[name])
        hint = " (encode text with jaxvla.tokenizer.encode)" if name == "prompt" else ""
        if value.dtype.kind not in _CONVERTIBLE_KINDS[field.dtype]:
            raise ValueError(
                f"observation {name!r} is a {value.dtype} array; the schema wants "
                f"{describe(field)}: {field.doc}{hint}"
            )
        if value.shape != field.shape:
            raise ValueError(
                f"observation {name!r} has shape {list(value.shape)}; the schema wants "
                f"{describe(field)}: {field.doc}"
            )
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            raise ValueError(f"observation {name!r} has non-finite values (NaN or inf): {value}")


def as_schema_dtypes(obs: dict, spec: dict[str, Spec] = OBSERVATION_SPEC) -> dict:
    """The observation with each field in its schema dtype (keys the schema does not name: as given)."""
    return {k: np.asarray(v, spec[k].dtype) if k in spec else np.asarray(v) for k, v in obs.items()}


# -------------------------------------------------------------------------------------------- episode
def _check_keys(where: str, got: dict, expected: Iterable[str]) -> None:
    if not isinstance(got, dict):
        raise ValueError(f"{where} must be a dict, got {type(got).__name__}")
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    if missing or extra:
        raise ValueError(f"{where}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}")


def _check_array(where: str, value, spec: Spec, length: int) -> None:
    array = np.asarray(value)
    expected = (length, *spec.shape)
    if array.dtype != spec.dtype or array.shape != expected:
        raise ValueError(
            f"{where} is {array.dtype}{list(array.shape)}, expected {np.dtype(spec.dtype)}{list(expected)} "
            f"(T = {length}, the length of steps/is_first)"
        )


FLOAT32_MAX = float(np.finfo(np.float32).max)
# The values a metadata number may take: what its RLDS dtype holds (finite; float32 overflows to inf past
# FLOAT32_MAX, int32 wraps) and what it can mean (retries and durations are not negative).
METADATA_RANGES: dict[str, tuple[float, float]] = {
    "operator_reward": (-FLOAT32_MAX, FLOAT32_MAX),
    "retries": (0, np.iinfo(np.int32).max),
    "cycle_time": (0.0, FLOAT32_MAX),
}


def _short(value, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: error messages travel back to clients and into logs."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _metadata_value(where: str, value, spec: Spec):
    """`value` as the plain Python scalar its spec stores (str, bool, int or float); ValueError naming
    `where` if it has the wrong kind. Numbers may arrive as Python scalars, numpy scalars or 0-d arrays
    (openpi's encoding of np.array(True)); an int is fine where a float is expected, never the reverse."""
    if spec.dtype is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} = {_short(value)} should be str")
        return value
    array = np.asarray(value)
    kinds = {"b": "b", "i": "iu", "f": "fiu"}[np.dtype(spec.dtype).kind]
    if array.ndim != 0 or array.dtype.kind not in kinds:
        raise ValueError(f"{where} = {_short(value)} should be an {np.dtype(spec.dtype).name} scalar")
    return {"b": bool, "i": int, "f": float}[np.dtype(spec.dtype).kind](array)


def _check_range(where: str, value, bounds: tuple[float, float]) -> None:
    low, high = bounds
    if not (math.isfinite(value) and low <= value <= high):
        raise ValueError(
            f"{where} = {value!r} is out of range: it must be finite, in [{low:.10g}, {high:.10g}]"
        )


def canonical_uuid(where: str, text: str) -> str:
    """`text` if it is a UUID spelled canonically (36 characters, lower-case hex, dashed), else ValueError.
    uuid.UUID also parses braces, 'urn:uuid:', upper case, no dashes and non-ASCII digits: each would be
    another key for the same episode, so only one spelling is accepted."""
    try:
        canonical = str(uuid.UUID(text))
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{where} = {_short(text)} is not a UUID") from None
    if text != canonical:
        raise ValueError(f"{where} = {_short(text)} is not a canonical UUID; send it as {canonical!r}")
    return text


def canonical_metadata(metadata: dict, where: str = "episode_metadata") -> dict:
    """The metadata with every value a plain Python scalar of its spec, checked: kinds, ranges, source,
    canonical episode_id. ValueError naming the first field that breaks the schema."""
    _check_keys(where, metadata, METADATA_SPEC)
    values = {
        name: _metadata_value(f"{where}/{name}", metadata[name], spec) for name, spec in METADATA_SPEC.items()
    }
    for name, bounds in METADATA_RANGES.items():
        _check_range(f"{where}/{name}", values[name], bounds)
    if values["source"] not in SOURCES:
        raise ValueError(f"{where}/source = {_short(values['source'])}; expected one of {SOURCES}")
    canonical_uuid(f"{where}/episode_id", values["episode_id"])
    return values


def check_episode(episode: dict, observation_spec: dict[str, Spec] = OBSERVATION_SPEC) -> int:
    """Raises ValueError naming the first field that breaks the schema; returns the episode's length T."""
    _check_keys("episode", episode, ("steps", "episode_metadata"))
    steps = episode["steps"]
    _check_keys("steps", steps, ("observation", *STEP_SPEC))
    _check_keys("steps/observation", steps["observation"], observation_spec)
    length = np.shape(steps["is_first"])[0] if np.ndim(steps["is_first"]) else 0
    if length < 1:
        raise ValueError(
            f"steps: an episode needs at least one step; is_first has shape {np.shape(steps['is_first'])}"
        )
    for name, spec in observation_spec.items():
        _check_array(f"steps/observation/{name}", steps["observation"][name], spec, length)
    for name, spec in STEP_SPEC.items():
        _check_array(f"steps/{name}", steps[name], spec, length)
    first_last = np.zeros((2, length), bool)
    first_last[0, 0] = first_last[1, -1] = True
    if not np.array_equal(np.stack([steps["is_first"], steps["is_last"]]), first_last):
        raise ValueError("steps: is_first must be set at step 0 only and is_last at the last step only")
    if not 0 <= np.min(steps["failure_mode"]) <= np.max(steps["failure_mode"]) < N_FAILURE_MODES:
        raise ValueError(f"steps/failure_mode must index FAILURE_MODES (0..{N_FAILURE_MODES - 1})")
    canonical_metadata(episode["episode_metadata"])
    return length


def _non_finite(where: str, tree: dict) -> str | None:
    """The path of the first float array in `tree` (nested dicts) with a NaN or inf, or None."""
    for name, value in tree.items():
        path = f"{where}/{name}"
        if isinstance(value, dict):
            found = _non_finite(path, value)
            if found:
                return found
        elif np.asarray(value).dtype.kind == "f" and not np.all(np.isfinite(value)):
            return path
    return None


def canonical_episode(episode: dict, observation_spec: dict[str, Spec] = OBSERVATION_SPEC) -> dict:
    """The one check an episode from outside passes before it is stored: `check_episode`, finite step
    values, and metadata as plain Python scalars. What it returns, `write_episodes` writes and
    `read_episodes` reads back. ValueError naming the first field that breaks the schema."""
    check_episode(episode, observation_spec)
    found = _non_finite("steps", episode["steps"])
    if found:
        raise ValueError(f"{found} has non-finite values (NaN or inf)")
    return {"steps": episode["steps"], "episode_metadata": canonical_metadata(episode["episode_metadata"])}
