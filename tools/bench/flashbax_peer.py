"""The replay peer: flashbax's trajectory buffer, and the n-step batches our learner reads made from its
sequences, so the learner section can feed the same SAC update from either replay."""

import jax
import jax.numpy as jnp

from learner import replay
from learner import sac
from tools.bench.blocks import BLOCK_ROWS

# The per-step payload flashbax stores: what a rollout block carries (`valid` and `is_first` only steer our
# insert; our buffer adds segment, sampleable and source, which flashbax has no use for).
FBX_FIELDS = ("obs", "action", "reward", "terminal", "intervention", "version", "reward_source")


def fbx_sequence_length(n_step: int, chunk: int) -> int:
    """Steps a flashbax sample needs: the chunk's actions and the observation n_step steps later."""
    return max(n_step + 1, chunk)


def fbx_buffer(capacity: int, sample_batch: int, sequence_length: int):
    """flashbax's trajectory buffer over the same `capacity` steps, one row per env of the rollout block.

    The closest flashbax equivalent of our replay: its flat buffer samples 2-step sequences (one-step
    transitions) and its item buffer keeps no time order, while an n-step target with an action chunk needs
    n_step + 1 consecutive steps. So: the trajectory buffer, sequences of n_step + 1 steps, period 1 (every
    step may start one, as every sampleable slot may in ours); `fbx_transitions` then turns a sequence into
    the n-step transition that our `replay.sample` returns directly.
    """
    import flashbax

    return flashbax.make_trajectory_buffer(
        add_batch_size=BLOCK_ROWS,
        sample_batch_size=sample_batch,
        sample_sequence_length=sequence_length,
        period=1,
        min_length_time_axis=sequence_length,
        max_length_time_axis=capacity // BLOCK_ROWS,
    )


def fbx_transitions(sequences: dict, source: jax.Array, *, n_step: int, chunk: int, gamma: float) -> dict:
    """flashbax sequences {field: [B, L, ...]} of consecutive steps -> the batch `sac.update` reads.

    The semantics of `replay.gather`: the reward sum and the chunk stop at the first terminal step and the
    target does not bootstrap past it. flashbax's rows hold one env each, so consecutive steps of a row are
    consecutive steps of the env and only terminal steps separate episodes. source [B] int8.
    """
    terminal = sequences["terminal"]
    alive = (jnp.cumsum(terminal, axis=1) - terminal) == 0  # [B, L]: no terminal step before this one
    powers = jnp.asarray(gamma, jnp.float32) ** jnp.arange(n_step, dtype=jnp.float32)
    reward = jnp.sum(jnp.where(alive[:, :n_step], sequences["reward"][:, :n_step], 0.0) * powers, axis=1)
    done = jnp.any(terminal[:, :n_step], axis=1)
    chunk_mask = alive[:, :chunk]
    weight = jnp.ones(reward.shape, jnp.float32)
    return {
        "obs": {k: v[:, 0] for k, v in sequences["obs"].items()},
        "chunk": jnp.where(chunk_mask[..., None], sequences["action"][:, :chunk], 0.0),
        "chunk_mask": chunk_mask,
        "reward": reward,
        "discount": jnp.where(done, 0.0, jnp.float32(gamma**n_step)),
        "next_obs": {k: v[:, n_step] for k, v in sequences["obs"].items()},
        "weight": weight,
        "source": source,
    }


def fbx_draw_batches(
    fbx_states: list, key: jax.Array, *, spec: sac.Spec, mixer, counts: dict[str, int]
) -> dict:
    """`sac.draw_batches` from flashbax buffers: utd + 1 normalised mixed batches [utd + 1, B, ...], drawn
    vectorised over the batches as ours are. As `sac.train_steps`' `draw_fn`, it feeds the same keys,
    normalisation and `sac.update` from flashbax's replay, so only the sampling differs."""
    config = spec.config
    source = jnp.concatenate(
        [jnp.full((count,), replay.SOURCES.index(name), jnp.int8) for name, count in counts.items()]
    )

    def draw(key):
        sequences = mixer.sample(fbx_states, key).experience
        batch = fbx_transitions(sequences, source, n_step=spec.chunk, chunk=spec.chunk, gamma=config.gamma)
        return sac.normalize_batch(batch, spec.nets.stats)

    return jax.vmap(draw)(jax.random.split(key, config.utd + 1))
