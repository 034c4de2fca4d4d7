"""The device mesh: one `data` axis. Batches split along it; parameters and optimiser state are replicated.

Works the same on one CPU, on fake CPU devices in tests, on a GPU and across hosts (`jax.devices()` is
global), so the training code never branches on the hardware.
"""

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"


def make_mesh(devices=None) -> Mesh:
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split across the mesh."""
    return NamedSharding(mesh, P(DATA))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    if batch_size % mesh.size:
        raise ValueError(f"batch size {batch_size} must be divisible by the {mesh.size} devices of the mesh")
