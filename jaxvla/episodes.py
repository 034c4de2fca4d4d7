"""Episodes on disk: the RLDS schema, and its I/O with tensorflow-datasets on array_record (no TensorFlow).

An episode in memory is a dict of numpy arrays, every step field stacked over time:

    {"steps": {"observation": {"proprio": f32[T, 7], "telemetry": f32[T, 3], "item": f32[T, 6],
                               "scene": f32[T, 10], "prompt": int32[T, 12]},
               "action": f32[T, 4], "policy_action": f32[T, 4], "reward": f32[T], "discount": f32[T],
               "is_first": bool[T], "is_last": bool[T], "is_terminal": bool[T], "is_intervention": bool[T],
               "failure_mode": int32[T], "events": bool[T, 7]},
     "episode_metadata": {"episode_id": str, "robot_id": str, "task": str, "prompt": str,
                          "policy_version": str, "source": str, "success": bool, "operator_reward": float,
                          "retries": int, "cycle_time": float}}

The schema is the three tables below (OBSERVATION_SPEC, STEP_SPEC, METADATA_SPEC); `features()` turns them
into the tfds FeaturesDict, so each field's meaning is also stored in the dataset's features.json. The
observation table is a parameter of every function here: a camera run adds an "image" entry to it.

Step t is one transition: the observation o_t, the action a_t sent from it, the reward r_t it earned, and
flags about where it led. `is_first` marks t = 0 and `is_last` the final transition. `is_terminal` marks a
final transition into a terminal state (success, drop, wrong bin, collision), where `discount` is 0; a
time-limit truncation ends with is_last and not is_terminal, discount 1. The observation after the last
action is not stored.

On disk a dataset is a folder named after it, `<data_dir>/<name>/`, holding tfds's version folder
`<version>/` (dataset_info.json, features.json, `<name>-train.array_record-NNNNN` shards) with one split,
"train", as RLDS datasets have. Open it with `read_episodes` / `open_dataset` here (either folder), with
`tfds.data_source(name, data_dir=data_dir, split="train")`, or with
`tfds.builder_from_directory(<data_dir>/<name>/<version>).as_data_source()`.
"""

import math
import os
import re
import uuid
from collections.abc import Iterable
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

SCHEMA_VERSION = "1.0.0"
SPLIT = "train"
SOURCES = ("offline", "online", "patch")
EPISODES_PER_SHARD = 256


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
    "prompt": Spec((12,), np.int32, "goal prompt token ids (jaxvla.tokenizer), PAD-filled"),
}

# Sizes of EVENTS and FAILURE_MODES in envs/cell.py (not imported: reading episodes must not need mujoco;
# tests/test_episodes.py checks they agree).
N_EVENTS = 7
N_FAILURE_MODES = 7

STEP_SPEC: dict[str, Spec] = {
    "action": Spec((4,), np.float32, "command sent to the robot: [dx, dy, dz, suction] in [-1, 1]"),
    "policy_action": Spec((4,), np.float32, "the policy's proposal (differs from action under intervention)"),
    "reward": Spec((), np.float32, "reward of this transition"),
    "discount": Spec((), np.float32, "0 on a terminal transition, else 1"),
    "is_first": Spec((), np.bool_, "first step of the episode"),
    "is_last": Spec((), np.bool_, "last step of the episode (terminal or truncated)"),
    "is_terminal": Spec((), np.bool_, "this transition ended the episode in a terminal state"),
    "is_intervention": Spec((), np.bool_, "a human or scripted operator chose the action"),
    "failure_mode": Spec((), np.int32, "failure so far, an index into envs.cell.FAILURE_MODES (0: none)"),
    "events": Spec((N_EVENTS,), np.bool_, "events of this step, flags over envs.cell.EVENTS"),
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


# -------------------------------------------------------------------------------------------- schema
def _feature(spec: Spec) -> tfds.features.FeatureConnector:
    if spec.dtype is str:
        return tfds.features.Text(doc=spec.doc)
    return tfds.features.Tensor(shape=spec.shape, dtype=spec.dtype, doc=spec.doc)


def features(observation_spec: dict[str, Spec] = OBSERVATION_SPEC) -> tfds.features.FeaturesDict:
    """The RLDS FeaturesDict: `steps` a nested tfds Dataset, `episode_metadata` a dict of scalars."""
    observation = tfds.features.FeaturesDict({k: _feature(s) for k, s in observation_spec.items()})
    steps = {"observation": observation, **{k: _feature(s) for k, s in STEP_SPEC.items()}}
    return tfds.features.FeaturesDict(
        {
            "steps": tfds.features.Dataset(steps),
            "episode_metadata": tfds.features.FeaturesDict(
                {k: _feature(s) for k, s in METADATA_SPEC.items()}
            ),
        }
    )


# ---------------------------------------------------------------------------------------- validation
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
    values = {name: _metadata_value(f"{where}/{name}", metadata[name], spec)
              for name, spec in METADATA_SPEC.items()}  # fmt: skip
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
        raise ValueError(f"steps/failure_mode must index envs.cell.FAILURE_MODES (0..{N_FAILURE_MODES - 1})")
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


def _checked(episodes: Iterable[dict], observation_spec: dict[str, Spec]) -> Iterator[dict]:
    """Validates each episode just before tfds serialises it; prefixes errors with the episode's index."""
    seen = set()
    for i, episode in enumerate(episodes):
        try:
            check_episode(episode, observation_spec)
        except ValueError as err:
            raise ValueError(f"episode {i}: {err}") from None
        episode_id = episode["episode_metadata"]["episode_id"]
        if episode_id in seen:
            raise ValueError(f"episode {i}: episode_id {episode_id} appears twice")
        seen.add(episode_id)
        yield episode
    if not seen:
        raise ValueError("no episodes to write")


# ---------------------------------------------------------------------------------------- test data
def random_array(rng: np.random.Generator, spec: Spec, length: int) -> np.ndarray:
    """[length, *spec.shape] random values of the spec's dtype (ints index the failure modes)."""
    shape = (length, *spec.shape)
    if spec.dtype is np.bool_:
        return rng.random(shape) < 0.5
    if spec.dtype is np.int32:
        return rng.integers(0, N_FAILURE_MODES, shape, dtype=np.int32)
    return rng.standard_normal(shape).astype(spec.dtype)


def random_episode(rng: np.random.Generator, length: int, robot_id: str = "sim-0") -> dict:
    """A schema-valid episode of random values (tests and benchmarks of storage and transport)."""
    steps = {name: random_array(rng, spec, length) for name, spec in STEP_SPEC.items()}
    steps["observation"] = {name: random_array(rng, spec, length) for name, spec in OBSERVATION_SPEC.items()}
    steps["is_first"] = np.arange(length) == 0
    steps["is_last"] = np.arange(length) == length - 1
    metadata = {
        "episode_id": str(uuid.UUID(bytes=rng.bytes(16), version=4)),
        "robot_id": robot_id,
        "task": "sort",
        "prompt": "put the blue part in compartment 3",
        "policy_version": "v7",
        "source": str(rng.choice(SOURCES)),
        "success": bool(rng.random() < 0.5),
        "operator_reward": float(rng.random()),  # float64 in, float32 on disk
        "retries": int(rng.integers(0, 4)),
        "cycle_time": np.float32(rng.random() * 10),
    }
    return {"steps": steps, "episode_metadata": metadata}


# ------------------------------------------------------------------------------------------- writing
def dataset_path(directory: str | os.PathLike, version: str = SCHEMA_VERSION) -> epath.Path:
    """The folder `write_episodes(directory, ...)` puts the files in: `<directory>/<version>/`."""
    return epath.Path(directory) / str(tfds.core.Version(version))


def write_episodes(
    directory: str | os.PathLike,
    episodes: Iterable[dict],
    *,
    version: str = SCHEMA_VERSION,
    observation_spec: dict[str, Spec] = OBSERVATION_SPEC,
    overwrite: bool = False,
    episodes_per_shard: int = EPISODES_PER_SHARD,
) -> epath.Path:
    """Writes `episodes` as the tfds dataset named `directory`'s last part; returns `<directory>/<version>`.

    All or nothing, streaming: each episode is checked (`check_episode`) just before it is written into a
    temporary folder beside `directory`, which is renamed into place only once every episode is written.
    So an invalid episode or a crash never leaves a partial dataset (nor replaces an existing one), and
    `episodes` may be a generator too large to hold in memory. An existing version raises FileExistsError
    unless `overwrite`.
    """
    directory = epath.Path(directory)
    name = directory.name
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"dataset folder {name!r} must be snake_case: tfds names the dataset after it")
    path = dataset_path(directory, version)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; delete it, choose another folder, or pass overwrite")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.parent / f".{name}-{path.name}.incomplete-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        # SequentialWriter is tfds's writer for examples already in hand: it encodes them with the
        # FeaturesDict, writes array_record shards in the order given and dataset_info.json, and needs
        # neither TensorFlow nor Beam. The builder path (`store_as_tfds_dataset`, `download_and_prepare`)
        # fails here in tfds 4.9.10: it imports the `importlib_resources` backport, which tfds does not
        # declare. Shard names have no "-of-N" suffix; dataset_info.json records their template.
        identity = tfds.core.dataset_info.DatasetIdentity(
            name=name, version=tfds.core.Version(version), data_dir=str(tmp), module_name=__name__
        )
        info = tfds.core.DatasetInfo(
            builder=identity,
            description=f"jaxvla workcell episodes (RLDS); schema in {__name__}",
            features=features(observation_spec),
        )
        writer = tfds.core.SequentialWriter(info, episodes_per_shard, file_format="array_record")
        writer.initialize_splits([SPLIT])
        writer.add_examples({SPLIT: _checked(episodes, observation_spec)})
        writer.close_all()
        directory.mkdir(exist_ok=True)
        if path.exists():  # overwrite: the old version goes only once the new one is complete
            old = directory.parent / f".{name}-{path.name}.old-{uuid.uuid4().hex}"
            path.rename(old)
            tmp.rename(path)
            old.rmtree()
        else:
            tmp.rename(path)
    finally:
        tmp.rmtree(missing_ok=True)
    return path


# ------------------------------------------------------------------------------------------- reading
def _version_folder(path: epath.Path) -> epath.Path:
    """`path` itself if it holds a dataset, else its newest version folder."""
    if (path / "dataset_info.json").exists():
        return path
    versions = [p for p in path.glob("*/dataset_info.json") if tfds.core.Version.is_valid(p.parent.name)]
    if not versions:
        raise FileNotFoundError(f"no tfds dataset in {path} (no dataset_info.json in it or a version folder)")
    return max((p.parent for p in versions), key=lambda p: tfds.core.Version(p.name))


def open_dataset(path: str | os.PathLike):
    """Random access to a dataset's episodes: len() and [i]. `path`: its folder or a version folder in it.

    Item i is tfds's decoding: numpy metadata (text as bytes) and `steps` as a sequence of step dicts.
    """
    return tfds.builder_from_directory(str(_version_folder(epath.Path(path)))).as_data_source(split=SPLIT)


def _stack(items: list[dict]) -> dict:
    """A list of nested dicts of arrays -> one nested dict of arrays with a new leading axis."""
    return {
        k: _stack([item[k] for item in items])
        if isinstance(v, dict)
        else np.stack([item[k] for item in items])
        for k, v in items[0].items()
    }


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_episodes(path: str | os.PathLike) -> list[dict]:
    """The episodes in `path` in the schema `write_episodes` takes: steps stacked, text as str, numbers
    as Python scalars. `path`: the dataset's folder or a version folder in it."""
    source = open_dataset(path)
    episodes = []
    for i in range(len(source)):
        example = source[i]
        metadata = example["episode_metadata"]
        metadata = {k: _text(v) if METADATA_SPEC[k].dtype is str else v for k, v in metadata.items()}
        episodes.append({"steps": _stack(list(example["steps"])), "episode_metadata": metadata})
    return episodes
