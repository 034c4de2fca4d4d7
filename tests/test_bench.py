"""The learner benchmark's pieces that could be wrong without being slow: flashbax's n-step batch and the
PyTorch reference's network sizes. Timings themselves are not tested (they belong in `tools.bench`)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import configs
from jaxvla import models
from learner import replay
from tools.bench import client
from tools.bench import flashbax_peer
from tools.bench import measure
from tools.bench import pretrain
from tools.bench import ratios as bench_ratios
from tools.bench import roofline
from tools.bench import torch_workers


def test_fbx_transitions_by_hand():
    # Two sequences of L = 5 steps, n_step = chunk = 4, gamma = 0.5, rewards 1, 2, 3, 4, 5.
    # Row 0, no terminal: reward 1 + 0.5*2 + 0.25*3 + 0.125*4 = 3.25, discount 0.5^4 = 0.0625, all 4
    # actions in the chunk, next_obs is step 4.
    # Row 1, terminal at step 1: reward 1 + 0.5*2 = 2, discount 0 (no bootstrap), chunk mask [1, 1, 0, 0].
    reward = jnp.tile(jnp.arange(1.0, 6.0), (2, 1))
    terminal = jnp.zeros((2, 5), bool).at[1, 1].set(True)
    sequences = {
        "obs": {"proprio": jnp.arange(10.0).reshape(2, 5, 1)},
        "action": jnp.ones((2, 5, 3)),
        "reward": reward,
        "terminal": terminal,
    }
    batch = flashbax_peer.fbx_transitions(sequences, jnp.zeros(2, jnp.int8), n_step=4, chunk=4, gamma=0.5)
    np.testing.assert_allclose(batch["reward"], [3.25, 2.0])
    np.testing.assert_allclose(batch["discount"], [0.0625, 0.0])
    np.testing.assert_array_equal(batch["chunk_mask"], [[1, 1, 1, 1], [1, 1, 0, 0]])
    np.testing.assert_array_equal(batch["chunk"][1, :, 0], [1, 1, 0, 0])
    np.testing.assert_array_equal(batch["obs"]["proprio"][:, 0], [0, 5])
    np.testing.assert_array_equal(batch["next_obs"]["proprio"][:, 0], [4, 9])


def test_fbx_sequence_length_covers_the_chunk_and_the_next_observation():
    assert flashbax_peer.fbx_sequence_length(4, 4) == 5
    assert flashbax_peer.fbx_sequence_length(1, 4) == 4


@pytest.mark.parametrize("name", ["debug", "default"])
def test_torch_reference_has_the_jax_networks_parameter_count(name):
    torch_bench = pytest.importorskip("tools.bench.torch_peer")
    config = configs.get_config(name)
    counts = replay.mix_counts(dict(zip(replay.SOURCES, config.sac.mix, strict=True)), 16, 1)
    capacities = dict.fromkeys(replay.SOURCES, 64)
    spec = torch_workers.torch_spec(config.model, config.sac, counts, capacities, steps=1, reps=1)
    torch_params = sum(
        p.numel() for net in (torch_bench.Policy(spec), torch_bench.Critic(spec)) for p in net.parameters()
    )
    jax_params = models.count_params(config.model.create_policy(0)) + models.count_params(
        config.model.create_critic(0)
    )
    assert torch_params == jax_params


def test_torch_reference_train_step_moves_every_network():
    torch_bench = pytest.importorskip("tools.bench.torch_peer")
    torch = pytest.importorskip("torch")
    config = configs.get_config("debug")
    counts = replay.mix_counts(dict(zip(replay.SOURCES, config.sac.mix, strict=True)), 16, 1)
    spec = {
        **torch_workers.torch_spec(config.model, config.sac, counts, dict.fromkeys(replay.SOURCES, 64), 1, 1),
        "seed": 0,
    }
    generator = torch.Generator().manual_seed(0)
    replays = [torch_bench.TensorReplay(spec, 64, source, generator) for source in range(len(counts))]
    learner = torch_bench.Learner(spec, replays, list(counts.values()))
    before = [flat_parameters(m) for m in (learner.actor, learner.critic, learner.target)]
    alpha = learner.log_alpha.item()
    learner.train_step()
    after = [flat_parameters(m) for m in (learner.actor, learner.critic, learner.target)]
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert learner.log_alpha.item() != alpha


def flat_parameters(module):
    """All of a torch module's parameters flattened into one tensor."""
    import torch

    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_paired_spread_pairs_repetitions_and_groups_calls():
    # Speed ratio ours / peer = peer seconds / our seconds, repetition by repetition.
    assert bench_ratios.paired_spread([1.0, 2.0, 1.0], [2.0, 2.0, 3.0], 3) == [1.0, 3.0]
    # Six calls summed into three repetitions of two: ours 2, 2, 4; peer 2, 4, 4.
    assert bench_ratios.paired_spread([1, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 2], 3) == [1.0, 2.0]


def test_stream_bound_is_the_weights_read_once():
    bound = client.stream_bound(weight_bytes=2_000_000, bandwidth=10e9)
    assert bound["stream_us"] == pytest.approx(200.0)
    assert bound["bound_us"] == pytest.approx(client.CLIENT_BOUND * 200.0)


def test_learner_ratios_carry_their_spread():
    learner = {
        "jax_fused": {"train_steps_per_s": 10.0, "call_s": [1.0, 1.0]},
        "jax_unfused": {"train_steps_per_s": 5.0, "call_s": [2.0, 2.0]},
        "jax_flashbax": {"status": "missing"},
        "torch": {
            "train_steps_per_s": 4.0,
            "call_s": [2.0, 3.0],
            "same_threads": {"train_steps_per_s": 2.0, "call_s": [5.0, 5.0]},
        },
    }
    replay_row = {
        "ours": {
            "add_items_per_s": 2.0,
            "add_s": [1.0] * 4,
            "sample_items_per_s": 1.0,
            "sample_s": [1.0, 1.0],
        },
        "flashbax": {
            "add_items_per_s": 1.0,
            "add_s": [2.0] * 4,
            "sample_items_per_s": 1.0,
            "sample_s": [1.0, 2.0],
        },
        "flashbax_nstep": {"status": "missing"},
    }
    ratios = bench_ratios.learner_ratios(learner, replay_row, reps=2)
    assert ratios["fused_over_torch"] == {"value": 2.5, "spread": [2.0, 3.0]}
    assert ratios["fused_over_torch_same_threads"]["value"] == 5.0
    assert ratios["add_over_flashbax"] == {"value": 2.0, "spread": [2.0, 2.0]}
    assert ratios["sample_over_flashbax"]["spread"] == [1.0, 2.0]
    assert ratios["fused_over_flashbax_fused"] is None and ratios["sample_over_flashbax_nstep"] is None
    assert "2.50x (per repetition 2.00-3.00)" in bench_ratios.ratio_lines(ratios)


def test_torch_worker_serves_repetitions_on_request():
    pytest.importorskip("torch")
    config = configs.get_config("debug")
    counts = replay.mix_counts(dict(zip(replay.SOURCES, config.sac.mix, strict=True)), 16, 1)
    spec = torch_workers.torch_spec(config.model, config.sac, counts, dict.fromkeys(replay.SOURCES, 64), 1, 2)
    worker = torch_workers.TorchWorker(spec, threads=1, limit=300)
    worker.times = [worker.repetition() for _ in range(2)]
    run = worker.close()
    assert run["threads"] == 1 and len(run["call_s"]) == 2 and run["train_steps_per_s"] > 0


def test_alternating_reverses_the_order_every_other_repetition():
    variants = {"ours": 1, "flashbax": 2}
    assert [name for name, _ in measure.alternating(variants, 0)] == ["ours", "flashbax"]
    assert [name for name, _ in measure.alternating(variants, 1)] == ["flashbax", "ours"]


def test_a_pretraining_variant_overrides_the_batch_and_model_fields_by_type():
    config, batch = pretrain.variant("vla_tiny:batch=16,remat=true,layers=3,attention=cudnn")
    base = configs.get_config("vla_tiny")
    assert batch == 16 and config.pretrain == base.pretrain
    assert config.model == dataclasses.replace(base.model, remat=True, layers=3, attention="cudnn")
    assert pretrain.variant("vla_tiny") == (base, base.pretrain.batch_size)
    with pytest.raises(ValueError, match="neither batch nor a model field"):
        pretrain.variant("vla_tiny:batchsize=16")


def test_the_roofline_counts_each_classes_flops_at_the_steps_shapes():
    result = roofline.bench_roofline("vla_tiny:batch=4", step_seconds=None, reps=1, limit=120)
    config, batch = pretrain.variant("vla_tiny:batch=4")
    s = roofline.step_shapes(config.model, batch)
    rows = {r["class"]: r for r in result["rows"]}
    # qkv, out, up and down, forward plus the two backward matmuls of each, in every block.
    dense = 2 * s.batch * s.tokens * (3 * s.width**2 + s.width**2 + 2 * s.width * s.mlp) * s.layers
    assert rows["block matmuls"]["flops"] == 3 * dense
    # q k^T and the weighted sum of v: 2 x 2 x B x H x N x N x (D / H) forward, twice that backward.
    attention = 4 * s.batch * s.tokens**2 * s.width * s.layers
    assert rows["attention core"]["flops"] == 3 * attention
    assert rows["norms, SiLU, residuals"]["flops"] == 0 == rows["optimizer (clip + AdamW)"]["flops"]
    assert all(r["seconds"] > 0 and r["bytes"] > 0 for r in rows.values())
    assert "whole BC step" not in roofline.roofline_table(result)
