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

The schema is three tables (OBSERVATION_SPEC, STEP_SPEC, METADATA_SPEC) in `jaxvla.schema`, which needs
numpy alone so that the robot checks its observations with it. `features()` turns them into the tfds
FeaturesDict, so each field's meaning is also stored in the dataset's features.json. The observation table
is a parameter of every function here: a camera run adds an "image" entry to it.

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

import os
import re
import uuid
from collections.abc import Iterable
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxvla.schema import METADATA_RANGES as METADATA_RANGES

# The schema's tables and checks live in `jaxvla.schema` (numpy only, so the robot can import them); they
# are re-exported here, where readers of episodes look for them.
from jaxvla.schema import METADATA_SPEC as METADATA_SPEC
from jaxvla.schema import N_EVENTS as N_EVENTS
from jaxvla.schema import N_FAILURE_MODES as N_FAILURE_MODES
from jaxvla.schema import OBSERVATION_SPEC as OBSERVATION_SPEC
from jaxvla.schema import SOURCES as SOURCES
from jaxvla.schema import STEP_SPEC as STEP_SPEC
from jaxvla.schema import Spec as Spec
from jaxvla.schema import canonical_episode as canonical_episode
from jaxvla.schema import canonical_metadata as canonical_metadata
from jaxvla.schema import canonical_uuid as canonical_uuid
from jaxvla.schema import check_episode as check_episode

SCHEMA_VERSION = "1.0.0"
SPLIT = "train"
EPISODES_PER_SHARD = 256


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
