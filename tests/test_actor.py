"""The numpy robot client: parity with the jitted JAX forward pass, file verification, the chunk broker,
and a run in a bare virtualenv that has numpy and msgpack only.

Parity is measured as |numpy - jax| / max(|jax|, 1): relative error for outputs larger than 1, absolute
error below (actions live in [-1, 1]). A floor much below 1 measures nothing but float32 rounding: both
passes sit ~2e-6 from a float64 reference at the default width (measured), so near-zero outputs cannot
agree to 1e-5 relative in any float32 implementation.
"""

import base64
import concurrent.futures
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO_ROOT
from flax import nnx

import jaxvla
from jaxvla import actor
from jaxvla import export
from jaxvla import models
from jaxvla import normalization
from jaxvla.actor import fileformat
from jaxvla.actor import forward
from jaxvla.actor import policy as actor_policy
from jaxvla.models import ModelConfig
from jaxvla.models import distributions
from jaxvla.models import layers
from jaxvla.normalization import normalize
from jaxvla.schema import OBSERVATION_SPEC
from jaxvla.schema import STATE_KEYS
from tools import twin as twin_tool

CONFIGS = {
    "state": ModelConfig(),
    "state_image_indicator": ModelConfig(image=True, advantage_conditioned=True),
    "transformer_image": ModelConfig(
        encoder="transformer", width=32, layers=2, attention_heads=4, image=True, image_res=16, patch_size=8
    ),
    "transformer": ModelConfig(encoder="transformer", width=32, layers=2, attention_heads=4),
}
# Measured maxima over mean, log_std and actions, batch of 8: state 2.7e-6, state_image_indicator 3.6e-6,
# transformer_image 2.3e-6, transformer 2.4e-6 (with a 1e-3 floor instead of 1: up to 3.0e-4).
PARITY_TOL = 1e-5
BATCH = 8


def unit_relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))


def norm_relative_error(a, b) -> float:
    """||a - b|| / ||b|| over the whole output: the usual relative error of a computed vector."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def random_stats(config: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    spec = config.observation_spec(1)
    return {
        k: {
            "mean": rng.normal(size=s.shape[-1]).astype(np.float32),
            "std": rng.uniform(0.5, 2.0, size=s.shape[-1]).astype(np.float32),
        }
        for k, s in spec.items()
        if k != "prompt"
    }


class Exported:
    """A random-init policy of one config, exported, with its JAX forward pass and a random batch."""

    def __init__(self, name: str, directory: pathlib.Path):
        self.config = config = CONFIGS[name]
        seed = list(CONFIGS).index(name)
        self.graphdef, self.params = nnx.split(config.create_policy(seed), nnx.Param)
        self.stats = random_stats(config, seed)
        self.obs = jax.device_get(config.fake_observation(jax.random.key(seed), BATCH))
        self.path = export.write(
            directory,
            config,
            self.params,
            self.stats,
            version=seed + 1,
            parent_version=None,
            config_hash=name,
        )
        stats = self.stats
        self.jax_forward = jax.jit(lambda p, o, i: models.apply(self.graphdef, p, normalize(o, stats), i))

    def reference(self, indicator=None) -> tuple[np.ndarray, np.ndarray]:
        return jax.device_get(self.jax_forward(self.params, self.obs, indicator))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    directory, cache = tmp_path_factory.mktemp("policies"), {}

    def get(name: str) -> Exported:
        if name not in cache:
            cache[name] = Exported(name, directory)
        return cache[name]

    return get


# ------------------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("name", list(CONFIGS))
def test_numpy_forward_matches_jax(exported, name):
    e = exported(name)
    policy = actor.load(e.path)
    indicator = None
    if e.config.advantage_conditioned:
        indicator = np.arange(BATCH) % 3  # none, positive, negative
    mean, log_std = e.reference(None if indicator is None else jnp.asarray(indicator))
    out = policy.infer(e.obs, indicator=indicator)
    errors = {
        "mean": unit_relative_error(out["mean"], mean),
        "log_std": unit_relative_error(out["log_std"], log_std),
        "actions": unit_relative_error(out["actions"], distributions.mode(mean)),
    }
    assert max(errors.values()) <= PARITY_TOL, errors
    norm_errors = {k: norm_relative_error(out[k], v) for k, v in (("mean", mean), ("log_std", log_std))}
    assert max(norm_errors.values()) <= PARITY_TOL, norm_errors
    assert out["actions"].shape == (BATCH, e.config.chunk, e.config.action_size)


def test_a_file_exported_before_patch_size_was_named_still_runs(exported):
    """Manifests written before `ModelConfig.patch` became `patch_size` name the field `patch`."""
    e = exported("transformer_image")
    manifest, arrays = fileformat.read(e.path)
    model = dict(manifest["model"])
    model["patch"] = model.pop("patch_size")
    assert ModelConfig.from_dict(model) == e.config
    old = actor_policy.Policy({**manifest, "model": model}, arrays)
    np.testing.assert_array_equal(old.infer(e.obs)["mean"], actor.load(e.path).infer(e.obs)["mean"])


@pytest.mark.parametrize("name", ["state", "transformer_image"])
def test_single_observation_matches_the_batch_and_jax(exported, name):
    e = exported(name)
    policy = actor.load(e.path)
    batched, (mean, log_std) = policy.infer(e.obs), e.reference()
    for i in range(3):
        single = policy.infer({k: v[i] for k, v in e.obs.items()})
        assert single["actions"].shape == (e.config.chunk, e.config.action_size)
        # One example runs matrix-vector products (a separate code path), a batch matrix-matrix ones.
        assert unit_relative_error(single["mean"], mean[i]) <= PARITY_TOL
        assert unit_relative_error(single["log_std"], log_std[i]) <= PARITY_TOL
        for key in ("mean", "log_std", "actions"):
            assert unit_relative_error(single[key], batched[key][i]) <= PARITY_TOL


def test_absent_indicator_means_none(exported):
    e = exported("state_image_indicator")
    policy = actor.load(e.path)
    absent = policy.infer(e.obs)
    none = policy.infer(e.obs, indicator=actor.INDICATOR_NONE)
    positive = policy.infer(e.obs, indicator=actor.INDICATOR_POSITIVE)
    np.testing.assert_array_equal(absent["mean"], none["mean"])
    assert not np.allclose(absent["mean"], positive["mean"])


def test_the_copied_layer_norm_epsilon_agrees_with_the_models():
    assert forward.LAYER_NORM_EPS == layers.LAYER_NORM_EPS


# ------------------------------------------------------------------------------------------ inputs
def test_sampling_is_reproducible_and_its_log_prob_is_the_learners(exported):
    e = exported("state")
    policy = actor.load(e.path)
    a = policy.infer(e.obs, rng=np.random.default_rng(3))
    b = policy.infer(e.obs, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a["actions"], b["actions"])
    assert np.all(np.abs(a["actions"]) <= 1.0) and not np.allclose(a["actions"], np.tanh(a["mean"]))
    u = np.random.default_rng(4).normal(size=a["mean"].shape).astype(np.float32)
    expected = jnp.sum(
        distributions._gaussian_log_prob(u, a["mean"], a["log_std"]) - distributions._squash_log_det(u),
        axis=(-2, -1),
    )
    np.testing.assert_allclose(actor_policy._log_prob(u, a["mean"], a["log_std"]), expected, rtol=1e-5)


def test_text_prompt_is_tokenized(exported):
    e = exported("state")
    policy = actor.load(e.path)
    obs = {k: v[0] for k, v in e.obs.items()}
    text = "put the blue part in compartment 3"
    np.testing.assert_array_equal(
        policy.infer({**obs, "prompt": text})["actions"],
        policy.infer({**obs, "prompt": jaxvla.tokenizer.encode(text)})["actions"],
    )


def test_kept_prompts_give_a_fresh_policys_actions_and_follow_each_change(exported, monkeypatch):
    """One observation's prompt is encoded once and kept (keyed on its bytes): a kept prompt gives the
    same actions as a policy that never saw it, a changed prompt changes them, also when the caller
    rewrites its prompt array in place, and the store holds at most PROMPT_CACHE prompts."""
    monkeypatch.setattr(actor_policy, "PROMPT_CACHE", 2)
    e = exported("state")
    policy = actor.load(e.path)
    observations = [{k: v[i] for k, v in e.obs.items()} for i in range(4)]
    assert len({o["prompt"].tobytes() for o in observations}) == 4
    fresh = [actor.load(e.path).infer(o)["actions"] for o in observations]
    prompt = observations[0]["prompt"].copy()
    for _ in range(2):  # the second round runs on prompts evicted and encoded again
        for o, expected in zip(observations, fresh, strict=True):
            prompt[:] = o["prompt"]
            np.testing.assert_array_equal(policy.infer({**o, "prompt": prompt})["actions"], expected)
            np.testing.assert_array_equal(policy.infer(o)["actions"], expected)
            assert len(policy._prompts) <= 2
    assert not np.allclose(fresh[0], fresh[1])
    text = "put the blue part in compartment 3"
    ids = jaxvla.tokenizer.encode(text)
    by_ids = actor.load(e.path).infer({**observations[0], "prompt": ids})["actions"]
    np.testing.assert_array_equal(policy.infer({**observations[0], "prompt": text})["actions"], by_ids)
    # The same bytes as another dtype are another prompt: int64 ids of the same words.
    np.testing.assert_array_equal(
        policy.infer({**observations[0], "prompt": ids.astype(np.int64)})["actions"], by_ids
    )


def test_threads_sharing_a_policy_get_their_own_actions(exported):
    """The one-observation pass keeps per-thread buffers and a per-thread fuse kernel holding its prompt."""
    e = exported("state")
    policy = actor.load(e.path)
    observations = [{k: v[i] for k, v in e.obs.items()} for i in range(4)]
    expected = [policy.infer(o)["actions"] for o in observations]

    def run(i: int) -> list[np.ndarray]:
        return [policy.infer(observations[(i + step) % 4])["actions"] for step in range(200)]

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(run, range(4)))
    for i, actions in enumerate(results):
        for step, a in enumerate(actions):
            np.testing.assert_array_equal(a, expected[(i + step) % 4])


def test_the_clients_normalisation_is_normalize_bit_for_bit():
    """`standardize` and `OneState` (in place, numpy) against `normalize` (the learner's), with values
    that clip on both sides and a NaN."""
    rng = np.random.default_rng(0)
    sizes = {k: OBSERVATION_SPEC[k].shape[0] for k in STATE_KEYS}
    stats = {
        k: {
            "mean": rng.normal(size=n).astype(np.float32),
            "std": rng.uniform(0.01, 2.0, size=n).astype(np.float32),
        }
        for k, n in sizes.items()
    }
    vectors = [(rng.normal(size=n) * 30).astype(np.float32) for n in sizes.values()]
    vectors[0][0] = np.nan
    state = np.concatenate(vectors)
    concatenated = {n: np.concatenate([stats[k][n] for k in sizes]) for n in ("mean", "std")}
    expected = normalize({"state": state}, {"state": concatenated})["state"]
    assert np.any(expected == 10.0) and np.any(expected == -10.0)
    np.testing.assert_array_equal(normalization.standardize(state, concatenated), expected)
    one = normalization.OneState(stats)
    for _ in range(2):  # the buffer is reused
        np.testing.assert_array_equal(one(vectors), np.append(expected, np.float32(1.0)))


def test_bad_inputs_are_named(exported):
    e = exported("state")
    policy = actor.load(e.path)
    obs = {k: v[0] for k, v in e.obs.items()}
    with pytest.raises(KeyError, match="telemetry"):
        policy.infer({k: v for k, v in obs.items() if k != "telemetry"})
    with pytest.raises(ValueError, match="'item' has shape"):
        policy.infer({**obs, "item": np.zeros(5)})
    with pytest.raises(ValueError, match="advantage indicator"):
        policy.infer(obs, indicator=actor.INDICATOR_POSITIVE)
    with pytest.raises(ValueError, match="token ids"):
        policy.infer({**obs, "prompt": np.full(12, -1, np.int32)})


def test_broker_hands_out_chunk_rows_and_replans(exported):
    e = exported("state")
    policy = actor.load(e.path)
    calls = []

    class Counting:
        chunk = policy.chunk

        def infer(self, obs, **kwargs):
            calls.append(1)
            return policy.infer(obs, **kwargs)

        def reset(self):
            calls.clear()

    broker = actor.ActionChunkBroker(Counting(), replan=2)
    observations = [{k: v[i] for k, v in e.obs.items()} for i in range(5)]
    steps = [broker.infer(o)["actions"] for o in observations]
    assert len(calls) == 3  # steps 0, 2, 4
    np.testing.assert_array_equal(steps[1], policy.infer(observations[0])["actions"][1])
    np.testing.assert_array_equal(steps[2], policy.infer(observations[2])["actions"][0])
    broker.reset()
    broker.infer(observations[0])
    assert len(calls) == 1
    with pytest.raises(ValueError, match="replan"):
        actor.ActionChunkBroker(policy, replan=policy.chunk + 1)


# ------------------------------------------------------------------------------------------- files
def tiny_file(tmp_path) -> pathlib.Path:
    config = ModelConfig(width=8, prompt_dim=4, depth=1, chunk=2)
    params = nnx.state(config.create_policy(0), nnx.Param)
    return export.write(
        tmp_path, config, params, random_stats(config, 0), version=1, parent_version=0, config_hash="tiny"
    )


def test_every_single_byte_corruption_is_refused(tmp_path):
    data = tiny_file(tmp_path).read_bytes()
    actor.loads(data)
    for i in range(len(data)):
        corrupt = bytearray(data)
        corrupt[i] ^= 0x01
        with pytest.raises(actor.PolicyFileError):
            actor.loads(bytes(corrupt))


def test_array_corruption_names_the_checksum(tmp_path):
    path = tiny_file(tmp_path)
    data = bytearray(path.read_bytes())
    kernel = fileformat.read(path)[1]["head/kernel"].tobytes()
    data[bytes(data).index(kernel) + 5] ^= 0xFF
    path.write_bytes(data)
    with pytest.raises(actor.PolicyFileError, match="array checksum mismatch"):
        actor.load(path)


def test_truncated_files_are_refused(tmp_path):
    data = tiny_file(tmp_path).read_bytes()
    for length in (0, 1, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(actor.PolicyFileError, match="truncated or corrupt"):
            actor.loads(data[:length])


def test_unknown_format_version_is_refused(tmp_path):
    manifest, arrays = fileformat.read(tiny_file(tmp_path))
    newer = fileformat.pack({**manifest, "format_version": fileformat.FORMAT_VERSION + 1}, arrays)
    with pytest.raises(actor.PolicyFileError, match="format version 2"):
        actor.loads(newer)
    foreign = fileformat.pack({**manifest, "format": "something-else"}, arrays)
    with pytest.raises(actor.PolicyFileError, match="not a jaxvla policy file"):
        actor.loads(foreign)


def test_arrays_that_do_not_fit_the_spec_are_refused(tmp_path):
    manifest, arrays = fileformat.read(tiny_file(tmp_path))
    with pytest.raises(actor.PolicyFileError, match="lacks"):
        actor.loads(fileformat.pack(manifest, {k: v for k, v in arrays.items() if k != "head/bias"}))
    with pytest.raises(actor.PolicyFileError, match="does not use"):
        actor.loads(fileformat.pack(manifest, {**arrays, "extra/kernel": np.zeros(3, np.float32)}))
    wider = {**manifest, "model": {**manifest["model"], "width": 16}}
    with pytest.raises(actor.PolicyFileError, match="the spec needs"):
        actor.loads(fileformat.pack(wider, arrays))


def test_sha256_is_over_names_dtypes_shapes_and_bytes():
    data = np.arange(6, dtype=np.float32).reshape(2, 3)
    packed = {"b": fileformat.pack_array(data), "a": fileformat.pack_array(np.array([7], np.int32))}
    digest = hashlib.sha256()
    digest.update(b"a\0<i4\x001\0" + np.array([7], "<i4").tobytes())
    digest.update(b"b\0<f4\x002,3\0" + data.astype("<f4").tobytes())
    assert fileformat.arrays_sha256(packed) == digest.hexdigest()


# ---------------------------------------------------------------------------------------- imports
ALLOWED = {"jaxvla", "numpy", "msgpack"}


def without_cython_runtime(modules: list[str]) -> set[str]:
    """Cython-compiled extensions (numpy's, msgpack's) register their runtime as top-level modules."""
    return {m for m in modules if m != "cython_runtime" and not m.startswith("_cython_")}


def test_actor_imports_only_numpy_msgpack_and_the_standard_library():
    code = (
        "import json, sys\n"
        "before = set(sys.modules)\n"
        "import jaxvla.actor\n"
        "loaded = {name.partition('.')[0] for name in set(sys.modules) - before}\n"
        "print(json.dumps(sorted(loaded - set(sys.stdlib_module_names))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert without_cython_runtime(json.loads(out.stdout)) <= ALLOWED


BARE_SCRIPT = """
import sys
before = set(sys.modules)
import importlib.util, json
import numpy as np
import jaxvla.actor
policy = jaxvla.actor.load(sys.argv[1])
with np.load(sys.argv[2]) as f:
    obs = dict(f)
actions = policy.infer(obs)["actions"]
loaded = {m.partition(".")[0] for m in set(sys.modules) - before}
print(json.dumps({
    "modules": sorted(loaded - set(sys.stdlib_module_names)),
    "importable": [
        m for m in ("jax", "jaxlib", "flax", "mujoco", "learner", "envs", "configs", "tools")
        if importlib.util.find_spec(m)
    ],
    "jaxvla_file": jaxvla.__file__,
    "actions": actions.tolist(),
}))
"""


def _wheel(out: pathlib.Path, stem: str, files: dict[str, bytes], tag: str) -> pathlib.Path:
    """Writes a wheel: `files` (archive name -> bytes, dist-info included) plus a fresh RECORD."""
    record = f"{stem.split('-')[0]}-{stem.split('-')[1]}.dist-info/RECORD"
    path = out / f"{stem}-{tag}.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        rows = []
        for name, data in files.items():
            z.writestr(name, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append(f"{name},sha256={digest},{len(data)}")
        z.writestr(record, "\n".join([*rows, f"{record},,"]) + "\n")
    return path


def _repack_installed(name: str, out: pathlib.Path) -> pathlib.Path:
    """A wheel of an installed distribution, from its RECORD (no index or download needed)."""
    dist = importlib.metadata.distribution(name)
    files = {}
    for f in dist.files:
        if (
            ".." in f.parts
            or "__pycache__" in f.parts
            or f.name in ("RECORD", "INSTALLER", "direct_url.json")
        ):
            continue
        files[f.as_posix()] = pathlib.Path(dist.locate_file(f)).read_bytes()
    tag = next(
        line.split(": ")[1] for line in dist.read_text("WHEEL").splitlines() if line.startswith("Tag:")
    )
    return _wheel(out, f"{dist.name}-{dist.version}", files, tag)


# Top-level names the learner side uses; a robot's site-packages must not get them (other projects use them).
CHECKOUT_PACKAGES = ("learner", "envs", "configs", "tools")
NOT_A_CHECKOUT = "jaxvla demo runs from a checkout of the repository ('tools' is not installed"
PIP_ENV = {**os.environ, "PIP_CONFIG_FILE": os.devnull}  # no user config, so no index


def _project_wheel(out: pathlib.Path, scratch: pathlib.Path) -> pathlib.Path:
    """The wheel `pip install jaxvla` installs, built by setuptools from pyproject.toml.

    Built from a copy of the checkout, since a build writes `build/` and `*.egg-info` beside the sources,
    and without build isolation, which would need an index (dev pins a setuptools with bdist_wheel).
    """
    source = scratch / "checkout"
    ignore = (".git", ".venv", ".cache", "runs", "data", "build", "dist", "*.egg-info", "__pycache__")
    shutil.copytree(REPO_ROOT, source, ignore=shutil.ignore_patterns(*ignore), symlinks=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "-w", str(out), str(source)], check=True, capture_output=True, env=PIP_ENV)
    (wheel,) = out.glob("jaxvla-*.whl")
    return wheel


@pytest.mark.slow
def test_actor_runs_in_a_bare_virtualenv(exported, tmp_path):
    """`pip install jaxvla` (no extras) from local wheels into a fresh venv, then load and infer.

    Offline: numpy and msgpack are repacked from this venv's installed files and the project wheel is
    built from the source tree, so pip resolves the declared dependencies against those wheels alone. The
    robot gets `jaxvla` and nothing else of this project: no generic top-level packages in its
    site-packages, and a learner command says it runs from a checkout.
    """
    e = exported("state_image_indicator")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("numpy", "msgpack"):
        _repack_installed(name, wheels)
    wheel = _project_wheel(wheels, tmp_path)
    with zipfile.ZipFile(wheel) as z:
        shipped = {name.split("/")[0] for name in z.namelist()}
    assert shipped == {"jaxvla", f"jaxvla-{jaxvla.__version__}.dist-info"}
    venv = tmp_path / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", venv], check=True, capture_output=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels), "jaxvla"]
    env = {"HOME": str(tmp_path), "PIP_CONFIG_FILE": os.devnull}  # no user config, no index, no cache
    subprocess.run(pip, check=True, capture_output=True, env=env)

    (site,) = venv.glob("lib/python*/site-packages")
    assert (site / "jaxvla" / "actor" / "loop.py").is_file()
    assert not {p.name for p in site.iterdir()} & set(CHECKOUT_PACKAGES)
    (record,) = site.glob("jaxvla-*.dist-info/RECORD")
    installed = {row.split(",")[0].split("/")[0] for row in record.read_text().splitlines()}
    assert installed == {"jaxvla", record.parent.name, ".."}  # "..": the `jaxvla` script in bin/

    obs_file = tmp_path / "obs.npz"
    np.savez(obs_file, **{k: v[0] for k, v in e.obs.items()})
    out = subprocess.run(
        [python, "-c", BARE_SCRIPT, str(e.path), str(obs_file)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result = json.loads(out.stdout)
    assert result["jaxvla_file"].startswith(str(venv))  # the installed copy, not the checkout
    assert result["importable"] == []
    assert without_cython_runtime(result["modules"]) <= ALLOWED
    expected = actor.load(e.path).infer({k: v[0] for k, v in e.obs.items()})["actions"]
    np.testing.assert_allclose(np.array(result["actions"], np.float32), expected, rtol=0, atol=1e-6)

    demo = subprocess.run(
        [str(venv / "bin" / "jaxvla"), "demo"], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert demo.returncode == 2 and demo.stderr.startswith(NOT_A_CHECKOUT), demo.stderr


def test_the_editable_install_imports_the_learner_side_from_this_checkout(tmp_path):
    """The README's `pip install -e`: from any folder, without the folder on sys.path (`-I`, as the
    `jaxvla` script runs), the checkout's packages are importable and are this checkout's."""
    names = ("jaxvla", *CHECKOUT_PACKAGES)
    code = f"import importlib.util as u, json; print(json.dumps([u.find_spec(n).origin for n in {names}]))"
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [str(REPO_ROOT / name / "__init__.py") for name in names]


# ------------------------------------------------------------------------------------ twin command
def test_twin_command_runs_a_policy_without_jax(exported, tmp_path):
    e = exported("state")
    report = tmp_path / "twin.json"
    argv = [
        "twin",
        "--policy",
        str(e.path),
        "--task",
        "pick_place",
        "--episodes",
        "2",
        "--replan",
        "2",
        "--json",
        str(report),
    ]
    code = (
        "import json, sys\n"
        "from jaxvla import cli\n"
        f"rc = cli.main({argv!r})\n"
        "print(json.dumps({'rc': rc, 'loaded': sorted(m for m in ('jax', 'flax') if m in sys.modules)}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"rc": 0, "loaded": []}
    assert "| success rate" in out.stdout
    result = json.loads(report.read_text())
    assert result["policy_version"] == 1 and result["policy_sha256"] == actor.read_manifest(e.path)["sha256"]
    summary = result["summary"]
    assert summary["episodes"] == 2 and len(result["episodes"]) == 2
    assert 0.0 <= summary["success_rate"] <= 1.0
    assert summary["successes"] + sum(summary["failure_modes"].values()) == 2
    assert [ep["seed"] for ep in result["episodes"]] == [0, 1]


def test_twin_summary_arithmetic():
    def episode(success, mode, retries, cycle, recovered=False):
        return {
            "success": success,
            "failure_mode": mode,
            "recovered": recovered,
            "retries": retries,
            "cycle_time_s": cycle,
            "steps": int(cycle * 10),
            "policy_s": cycle / 100,
        }

    episodes = [
        episode(True, "none", 0, 5.0),
        episode(True, "none", 1, 7.0, True),
        episode(False, "drop", 2, 3.0),
    ]
    s = twin_tool.summarize(episodes)
    assert s["success_rate"] == pytest.approx(2 / 3) and s["recovered"] == 1
    assert s["failure_modes"] == {"drop": 1}
    assert s["retries_per_episode"] == pytest.approx(1.0)  # (0 + 1 + 2) / 3
    assert s["cycle_time_s"] == pytest.approx(6.0)  # successes only: (5 + 7) / 2
    assert s["successes_per_sim_hour"] == pytest.approx(480.0)  # 2 successes in 15 simulated s
    assert s["policy_ms_per_step"] == pytest.approx(1.0)  # 0.15 s over 150 steps
