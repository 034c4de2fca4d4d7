"""One process of the two-process SAC update test: `python sac_distributed_worker.py RANK PORT OUT_DIR`.

Both processes build the same state and batches, join a `jax.distributed` cluster on loopback (two CPU
devices each, CPU collectives over gloo), run one update data-parallel over the four global devices, and
rank 0 writes the updated parameters to OUT_DIR/update.npz for the test to compare.
"""

import pathlib
import sys

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from test_sac import small_setup  # noqa: E402

from learner import sac  # noqa: E402
from learner import sharding  # noqa: E402


def global_array(value, target_sharding):
    """A global jax.Array from a value every process holds in full."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, target_sharding, lambda index: value[index])


def main(rank: int, port: int, out_dir: pathlib.Path) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=rank, initialization_timeout=120
    )
    spec, state, batches = small_setup(batch=16)
    mesh = sharding.make_mesh(jax.devices())
    replicated = sharding.replicated(mesh)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.DATA))
    state = jax.tree.map(lambda x: global_array(x, replicated), jax.device_get(state))
    batches = jax.tree.map(lambda x: global_array(x, split), jax.device_get(batches))
    key = jax.random.key(3)
    update = sac.make_update(spec, mesh)
    new, metrics = update(state, batches, key)
    local = lambda x: np.asarray(x.addressable_data(0))  # noqa: E731  (replicated: every process has all of it)
    leaves = [local(x) for x in jax.tree.leaves((new.actor, new.critic, new.log_alpha))]
    if rank == 0:
        np.savez(
            out_dir / "update.npz",
            leaves=len(leaves),
            global_devices=jax.device_count(),
            processes=jax.process_count(),
            critic_loss=local(metrics["critic_loss"]),
            **{f"leaf{i}": leaf for i, leaf in enumerate(leaves)},
        )
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
