"""RLDS episodes: the schema, the round trip through tensorflow-datasets, and `jaxvla data generate`."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from envs import cell
from envs import demos as operator_demos
from jaxvla import episodes as E
from jaxvla import schema
from jaxvla import tokenizer
from tools import data

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def assert_same_episode(got: dict, want: dict) -> None:
    """Every field equal, arrays with their dtypes; metadata numbers compared at the schema's dtype."""
    for name in E.OBSERVATION_SPEC:
        want_obs = want["steps"]["observation"][name]
        np.testing.assert_array_equal(got["steps"]["observation"][name], want_obs, strict=True)
    for name in E.STEP_SPEC:
        np.testing.assert_array_equal(got["steps"][name], want["steps"][name], strict=True)
    assert set(got["episode_metadata"]) == set(E.METADATA_SPEC)
    for name, spec in E.METADATA_SPEC.items():
        got_value, want_value = got["episode_metadata"][name], want["episode_metadata"][name]
        if spec.dtype is str:
            assert got_value == want_value and isinstance(got_value, str), name
        else:
            assert spec.dtype(got_value) == spec.dtype(want_value), name


def test_write_then_read_returns_every_field_exactly(tmp_path):
    rng = np.random.default_rng(0)
    episodes = [E.random_episode(rng, length) for length in (1, 7, 12)]
    path = E.write_episodes(tmp_path / "demo", episodes)

    assert path == tmp_path / "demo" / E.SCHEMA_VERSION
    back = E.read_episodes(tmp_path / "demo")
    assert len(back) == len(episodes)
    for got, want in zip(back, episodes, strict=True):
        assert_same_episode(got, want)


def test_dataset_opens_with_tfds_readers(tmp_path):
    rng = np.random.default_rng(1)
    episodes = [E.random_episode(rng, length) for length in (3, 4)]
    path = E.write_episodes(tmp_path / "demo", episodes, episodes_per_shard=1)

    assert {p.name for p in path.iterdir()} == {
        "dataset_info.json",
        "features.json",
        "demo-train.array_record-00000",
        "demo-train.array_record-00001",
    }
    source = tfds.builder_from_directory(str(path)).as_data_source()["train"]
    by_name = tfds.data_source("demo", data_dir=str(tmp_path), split="train")
    assert len(source) == len(by_name) == 2
    first = by_name[1]
    assert first["episode_metadata"]["episode_id"].decode() == episodes[1]["episode_metadata"]["episode_id"]
    assert len(first["steps"]) == 4
    np.testing.assert_array_equal(first["steps"][3]["action"], episodes[1]["steps"]["action"][3])
    # The schema's field docs travel with the data, for other RLDS tools.
    assert E.STEP_SPEC["is_terminal"].doc in (path / "features.json").read_text()


WRITE_AND_READ = """
import json, sys, uuid
import numpy as np
from jaxvla import episodes as E

T = 3
steps = {k: np.zeros((T, *s.shape), s.dtype) for k, s in E.STEP_SPEC.items()}
steps["observation"] = {k: np.ones((T, *s.shape), s.dtype) for k, s in E.OBSERVATION_SPEC.items()}
steps["is_first"], steps["is_last"] = np.arange(T) == 0, np.arange(T) == T - 1
meta = dict(episode_id=str(uuid.uuid4()), robot_id="r", task="t", prompt="p", policy_version="v",
            source="online", success=True, operator_reward=1.0, retries=0, cycle_time=0.3)
path = E.write_episodes(sys.argv[1] + "/d", [{"steps": steps, "episode_metadata": meta}])
(back,) = E.read_episodes(path)
assert back["steps"]["observation"]["proprio"].shape == (T, 7)
print(json.dumps(sorted({"tensorflow", "jax", "mujoco"} & set(sys.modules))))
"""


def test_reading_and_writing_need_neither_tensorflow_nor_jax(tmp_path):
    # A fresh interpreter (this one has jax, mujoco and the test helpers loaded). Where TensorFlow is not
    # installed (CI) this shows nothing here needs it; where it is, that this path never imports it.
    result = subprocess.run(
        [sys.executable, "-c", WRITE_AND_READ, str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(result.stdout.splitlines()[-1]) == []


def corrupt(episode: dict, how: str) -> None:
    steps, metadata = episode["steps"], episode["episode_metadata"]
    if how == "missing field":
        del steps["discount"]
    elif how == "extra field":
        steps["observation"]["image"] = np.zeros((len(steps["reward"]), 2, 2, 4), np.float32)
    elif how == "wrong dtype":
        steps["action"] = steps["action"].astype(np.float64)
    elif how == "wrong shape":
        steps["events"] = steps["events"][:, :6]
    elif how == "inconsistent T":
        steps["reward"] = steps["reward"][:-1]
    elif how == "is_last early":
        steps["is_last"] = np.roll(steps["is_last"], -1)
    elif how == "failure mode out of range":
        steps["failure_mode"][0] = E.N_FAILURE_MODES
    elif how == "text as bytes":
        metadata["task"] = b"sort"
    elif how == "float for an int":
        metadata["retries"] = 1.5
    elif how == "unknown source":
        metadata["source"] = "simulation"
    elif how == "episode id not a uuid":
        metadata["episode_id"] = "episode-7"


CORRUPTIONS = {
    "missing field": "steps: missing fields ['discount']",
    "extra field": "unexpected fields ['image']",
    "wrong dtype": "steps/action is float64[5, 4], expected float32[5, 4]",
    "wrong shape": "steps/events is bool[5, 6], expected bool[5, 7]",
    "inconsistent T": "steps/reward is float32[4], expected float32[5]",
    "is_last early": "is_last at the last step only",
    "failure mode out of range": "steps/failure_mode must index",
    "text as bytes": "episode_metadata/task = b'sort' should be str",
    "float for an int": "episode_metadata/retries = 1.5 should be an int32 scalar",
    "unknown source": "episode_metadata/source = 'simulation'",
    "episode id not a uuid": "is not a UUID",
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_bad_input_raises_a_clear_error_and_writes_nothing(tmp_path, how):
    rng = np.random.default_rng(2)
    episodes = [E.random_episode(rng, 5) for _ in range(3)]
    corrupt(episodes[2], how)  # the good episodes before it are written first, then thrown away
    with pytest.raises(ValueError) as err:
        E.write_episodes(tmp_path / "demo", episodes)
    assert str(err.value).startswith("episode 2: ")
    assert CORRUPTIONS[how] in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_episode_ids_and_empty_input_are_refused(tmp_path):
    episode = E.random_episode(np.random.default_rng(3), 2)
    with pytest.raises(ValueError, match="episode 1: episode_id .* appears twice"):
        E.write_episodes(tmp_path / "demo", [episode, episode])
    with pytest.raises(ValueError, match="no episodes"):
        E.write_episodes(tmp_path / "demo", iter([]))
    assert list(tmp_path.iterdir()) == []


def test_an_existing_dataset_is_kept_unless_overwritten(tmp_path):
    rng = np.random.default_rng(4)
    old, new = E.random_episode(rng, 2), E.random_episode(rng, 3)
    directory = tmp_path / "demo"
    path = E.write_episodes(directory, [old])
    with pytest.raises(FileExistsError):
        E.write_episodes(directory, [new])
    bad = E.random_episode(rng, 3)
    corrupt(bad, "wrong dtype")
    with pytest.raises(ValueError):
        E.write_episodes(directory, [new, bad], overwrite=True)
    assert_same_episode(*E.read_episodes(path), old)  # a failed overwrite leaves the old dataset

    assert E.write_episodes(directory, [new], overwrite=True) == path
    assert_same_episode(*E.read_episodes(path), new)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folders left behind
    assert [p.name for p in directory.iterdir()] == [E.SCHEMA_VERSION]


def test_reading_finds_the_newest_version_and_explains_a_missing_dataset(tmp_path):
    rng = np.random.default_rng(6)
    old, new = E.random_episode(rng, 2), E.random_episode(rng, 3)
    E.write_episodes(tmp_path / "demo", [old], version="1.0.0")
    E.write_episodes(tmp_path / "demo", [new], version="1.10.0")
    assert_same_episode(*E.read_episodes(tmp_path / "demo"), new)
    assert_same_episode(*E.read_episodes(tmp_path / "demo" / "1.0.0"), old)
    with pytest.raises(FileNotFoundError, match="no tfds dataset"):
        E.read_episodes(tmp_path)


def test_dataset_folder_must_be_a_tfds_name(tmp_path):
    with pytest.raises(ValueError, match="snake_case"):
        E.write_episodes(tmp_path / "Pick-Place", [E.random_episode(np.random.default_rng(7), 2)])


# ------------------------------------------------------------------------------------ data generate
def fake_batch_record(lengths_and_ends: list[tuple[int | None, str]], horizon: int) -> dict:
    """A rollout record (leaves [T, B, ...]); env b ends by done or truncated at step n (None: never)."""
    batch = len(lengths_and_ends)
    done = np.zeros((horizon, batch), bool)
    truncated = np.zeros((horizon, batch), bool)
    for b, (n, how) in enumerate(lengths_and_ends):
        if n is not None:  # frozen after the end, so the flag stays set, as rollout's freeze leaves it
            (done if how == "done" else truncated)[n - 1 :, b] = True
    rng = np.random.default_rng(5)
    obs = {name: E.random_array(rng, spec, horizon * batch) for name, spec in E.OBSERVATION_SPEC.items()}
    obs = {name: x.reshape(horizon, batch, *x.shape[1:]) for name, x in obs.items()}
    obs["prompt"][:] = tokenizer.encode("put the red part in compartment 2")
    step = np.arange(1, horizon + 1, dtype=np.float32)[:, None].repeat(batch, 1)
    info = {
        "failure_mode": np.full((horizon, batch), cell.NONE, np.int32),
        "events": np.zeros((horizon, batch, E.N_EVENTS), bool),
        "success": done.copy(),
        "retries": np.full((horizon, batch), 2, np.int32),
        "cycle_time": step / 10,
    }
    return {
        "obs": obs,
        "action": rng.uniform(-1, 1, (horizon, batch, 2 * schema.ACTION_SIZE)).astype(np.float32),
        "reward": done.astype(np.float32),
        "done": done,
        "truncated": truncated,
        "info": info,
    }


def test_to_episodes_cuts_each_env_at_its_end_and_labels_it():
    horizon = 8
    record = fake_batch_record([(3, "done"), (8, "truncated"), (None, "")], horizon)
    episodes = operator_demos.to_episodes(record, "sort")
    for episode in episodes:
        E.check_episode(episode)

    assert [len(e["steps"]["reward"]) for e in episodes] == [3, 8, 8]
    terminal, truncated, unfinished = episodes
    np.testing.assert_array_equal(terminal["steps"]["is_terminal"], [False, False, True])
    np.testing.assert_array_equal(terminal["steps"]["discount"], [1, 1, 0])
    assert not truncated["steps"]["is_terminal"].any() and truncated["steps"]["discount"].min() == 1
    assert not unfinished["steps"]["is_terminal"].any()
    # The recorded action is the command (first half); the executed noisy half is not stored.
    np.testing.assert_array_equal(terminal["steps"]["action"], record["action"][:3, 0, :4])
    np.testing.assert_array_equal(terminal["steps"]["policy_action"], terminal["steps"]["action"])
    assert terminal["steps"]["is_intervention"].all()

    meta = terminal["episode_metadata"]
    assert meta["success"] is True and meta["operator_reward"] == 1.0
    assert meta["cycle_time"] == pytest.approx(0.3) and meta["retries"] == 2
    assert meta["prompt"] == "put the red part in compartment 2" and meta["task"] == "sort"
    assert truncated["episode_metadata"]["success"] is False
    assert truncated["episode_metadata"]["operator_reward"] == 0.0
    assert len({e["episode_metadata"]["episode_id"] for e in episodes}) == 3


def test_generate_refuses_to_overwrite_before_simulating(tmp_path, capsys):
    E.dataset_path(tmp_path / "pick_place_train").mkdir(parents=True)
    argv = ["generate", "--task", "pick_place", "--split", "train", "--episodes", "1", "--out", str(tmp_path)]
    assert data.main(argv) == 2
    assert "pass --overwrite" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_writes_operator_demonstrations(tmp_path, capsys):
    argv = ["generate", "--task", "pick_place", "--split", "train", "--episodes", "4", "--num-envs", "4"]
    assert data.main([*argv, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "success rate" in out

    episodes = E.read_episodes(tmp_path / "pick_place_train")
    assert len(episodes) == 4
    prompt = "pick the part from the tote and place it in the bin"
    for episode in episodes:
        steps, meta = episode["steps"], episode["episode_metadata"]
        length = len(steps["reward"])
        assert length >= 10
        np.testing.assert_array_equal(steps["is_first"], np.arange(length) == 0)
        np.testing.assert_array_equal(steps["is_last"], np.arange(length) == length - 1)
        assert np.abs(steps["action"]).max() <= 1.0
        assert (meta["task"], meta["prompt"], meta["source"]) == ("pick_place", prompt, "offline")
        assert tokenizer.decode(steps["observation"]["prompt"][0]) == prompt
        if meta["success"]:
            assert steps["is_terminal"][-1] and steps["discount"][-1] == 0 and steps["reward"][-1] == 1
    assert sum(e["episode_metadata"]["success"] for e in episodes) >= 3
