"""The splits as mixtures: component frequencies and ranges, checked by hand on a large sample.

Parameters are drawn with numpy through the same `cell.sample_params` the MJX env and the C twin use, so
no physics is compiled here.
"""

import dataclasses

import numpy as np
import pytest
import scipy.stats

from envs import cell as C
from envs.tasks import TASKS
from envs.tasks import TRAIN
from envs.tasks import Component
from envs.tasks import Split
from jaxvla.schema import SPLITS

DRAWS = 20_000


def draw(task: str, split: str, draws: int = DRAWS, seed: int = 0) -> list[C.Params]:
    spec = TASKS[task]
    rng = np.random.default_rng(seed)
    mixture, prompts = spec.split(split), spec.prompt_tokens()
    return [
        C.sample_params(
            np, rng.random(C.N_UNIFORMS), spec, mixture, spec.default_config, prompts, rng.random()
        )
        for _ in range(draws)
    ]


def field(params: list[C.Params], name: str) -> np.ndarray:
    return np.stack([getattr(p, name) for p in params])


@pytest.mark.parametrize("task", ["pick_place", "sort"])
def test_deploy_draws_each_component_at_its_weight_within_its_ranges(task):
    mixture = TASKS[task].split("deploy")
    params = draw(task, "deploy")
    component = field(params, "component")
    for i, part in enumerate(mixture.components):
        count = int(np.sum(component == i))
        # Two-sided binomial interval a correct sampler leaves with probability 1e-3.
        lo, hi = scipy.stats.binom.interval(0.999, DRAWS, part.weight)
        assert lo <= count <= hi, (part.name, count, part.weight)

        mine = [p for p, c in zip(params, component, strict=True) if c == i]
        r = part.ranges
        for name, (low, high) in (
            ("item_mass", r.mass),
            ("porosity", r.porosity),
            ("surface_seal", r.surface_seal),
            ("item_friction", r.friction),
        ):
            values = field(mine, name)
            assert values.min() >= low - 1e-6 and values.max() <= high + 1e-6, (part.name, name)
            # The draws fill the range: the extremes of thousands of uniforms sit near its ends.
            assert values.min() < low + 0.02 * (high - low) and values.max() > high - 0.02 * (high - low)
        nominal = C.nominal_bins(TASKS[task])[0, :2]
        shift = field(mine, "bins")[:, 0, :2] - nominal
        assert shift[:, 0].min() >= r.bin_shift_x[0] - 1e-6 and shift[:, 0].max() <= r.bin_shift_x[1] + 1e-6
        magnitude = np.abs(shift[:, 1]) if r.bin_shift_y_either_way else shift[:, 1]
        assert magnitude.min() >= r.bin_shift_y[0] - 1e-6 and magnitude.max() <= r.bin_shift_y[1] + 1e-6
        if r.bin_shift_y_either_way:  # both sides, about equally
            left = int(np.sum(shift[:, 1] < 0))
            lo, hi = scipy.stats.binom.interval(0.999, len(mine), 0.5)
            assert lo <= left <= hi


def test_single_component_splits_draw_what_they_always_drew():
    # The component's uniform comes after the parameters' own, so `train` and `novel` keep their contexts.
    spec = TASKS["pick_place"]
    rng = np.random.default_rng(3)
    u = rng.random(C.N_UNIFORMS)
    a = C.sample_params(np, u, spec, spec.split("train"), spec.default_config, spec.prompt_tokens(), 0.1)
    b = C.sample_params(np, u, spec, spec.split("train"), spec.default_config, spec.prompt_tokens(), 0.9)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert int(a.component) == 0


def test_every_task_has_every_split_and_the_tail_split_is_the_deploy_tails():
    for spec in TASKS.values():
        assert tuple(spec.split(name).name for name in SPLITS) == SPLITS
    deploy, tail = TASKS["sort"].split("deploy"), TASKS["sort"].split("tail")
    tails = [c for c in deploy.components if c.name != "train"]
    assert [c.ranges for c in tail.components] == [c.ranges for c in tails]
    total = sum(c.weight for c in tails)
    assert [c.weight for c in tail.components] == pytest.approx([c.weight / total for c in tails])


def test_a_mixture_refuses_mixed_shapes_and_weights_that_do_not_sum_to_one():
    capsule = dataclasses.replace(TRAIN, shape="capsule", half_size=((0.02, 0.03), (0.02, 0.03)))
    with pytest.raises(ValueError, match="shape"):
        Split("bad", (Component("a", 0.5, TRAIN), Component("b", 0.5, capsule)))
    with pytest.raises(ValueError, match="sum to 1"):
        Split("bad", (Component("a", 0.5, TRAIN),))
    with pytest.raises(ValueError, match="unknown split"):
        TASKS["sort"].split("deployy")
