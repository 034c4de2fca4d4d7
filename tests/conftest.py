"""Test settings: four fake CPU devices, and a persistent compilation cache shared across runs.

The environment variables must be set before jax is imported anywhere, so they come first.
"""

import dataclasses
import os
import pathlib

import pytest
import scipy.stats

FAKE_DEVICES_FLAG = "--xla_force_host_platform_device_count=4"

# Appended rather than overwritten so flags the caller set still apply.
if FAKE_DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAKE_DEVICES_FLAG}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402  (must follow the environment set-up above)

import configs  # noqa: E402
from learner import compile_cache  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# The repository's cache, wherever pytest runs from; the commands the tests start are pointed at it too.
COMPILE_CACHE = REPO_ROOT / configs.COMPILE_CACHE

compile_cache.enable(COMPILE_CACHE)

# The files that take longest (their MJX compiles), longest first. pytest-xdist hands whole files to its two
# workers in collection order (pyproject.toml turns off its reordering by test count, which started these
# last): the suite ends when the busier worker does, so a long file started late runs alone at the end.
# test_patch.py follows test_pro.py rather than running beside test_patch_cli.py: it then reads the
# programs the two share (the residual's evaluator and train step) from the compile cache.
LONGEST_FIRST = (
    "test_patch_cli.py",
    "test_pro.py",
    "test_patch.py",
    "test_operator.py",
    "test_evaluate.py",
    "test_sac.py",
    "test_wrappers.py",
    "test_recap.py",
    "test_fleet_learner.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The files of LONGEST_FIRST first, in its order; the others after them, as collected."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def fewest_successes(trials: int, rate: float, failure_probability: float = 1e-3) -> int:
    """The success count to assert for `trials` episodes of a policy whose true success rate is `rate`.

    A correct policy falls below it with probability at most `failure_probability`, whatever the seed or
    the machine: MJX's float results differ between CPUs, so a fixed key does not fix the count.
    """
    # ppf gives the smallest k with P(X <= k) >= q, so P(X < k) < q.
    return int(scipy.stats.binom.ppf(failure_probability, trials, rate))


class FakeTime:
    """A clock that advances only when slept on: the runner's `clock` and `sleep`, with no real waiting."""

    def __init__(self):
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class CompiledEnv:
    """An env with its reset, step and operator step jitted once per test session (compiles are slow)."""

    def __init__(self, task: str, split: str):
        from envs.workcell import Workcell

        self.env = Workcell(task, split)
        self.reset = jax.jit(self.env.reset)
        self.reset_from_params = jax.jit(self.env.reset_from_params)
        self.step = jax.jit(self.env.step)
        self.operator_action = jax.jit(self.env.operator_action)


_COMPILED: dict[tuple[str, str], CompiledEnv] = {}


def compiled_env(task: str, split: str = "train") -> CompiledEnv:
    if (task, split) not in _COMPILED:
        _COMPILED[task, split] = CompiledEnv(task, split)
    return _COMPILED[task, split]


def write_tiny_prior(run_dir: pathlib.Path) -> None:
    """A `jaxvla pretrain debug` run folder holding an untrained policy at step 0."""
    from flax import nnx

    import configs
    from jaxvla import normalization
    from learner import bc
    from learner import pretrain
    from learner.checkpoints import Checkpoints

    config = configs.get_config("debug")
    _, params = nnx.split(config.model.create_policy(0), nnx.Param)
    stats = normalization.compute(jax.device_get(config.model.fake_observation(jax.random.key(0), 256)))
    checkpoints = Checkpoints(run_dir / "checkpoints")
    checkpoints.save(
        0, bc.init_state(params, bc.make_optimizer(1.0, 1, 0, 0.0)), pretrain.config_meta(config, stats)
    )
    checkpoints.close()


def write_tiny_state_pro(run_dir: pathlib.Path, stats: dict) -> None:
    """A `jaxvla pro train` run folder holding an untrained, tiny state-only PRO (a potential and a risk
    to read, as the shaping reward, the risk trigger and the fleet's monitor need), normalised by `stats`."""
    from flax import nnx

    from jaxvla.models.pro import ProNetConfig
    from learner import bc
    from learner import pro
    from learner.checkpoints import Checkpoints

    net = ProNetConfig(
        width=16, prompt_dim=4, action_width=8, window=4, heads=2, value_bins=11, action_input=False
    )
    pc = dataclasses.replace(configs.ProConfig(), net=net)
    _, params = nnx.split(net.create(0), nnx.Param)
    checkpoints = Checkpoints(run_dir / "checkpoints")
    state = bc.init_state(params, bc.make_optimizer(1e-3, 1, 0, 0.0))
    checkpoints.save(0, state, pro.checkpoint_meta(pc, stats))
    checkpoints.close()
