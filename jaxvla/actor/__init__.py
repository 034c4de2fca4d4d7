"""The robot-side client: run an exported policy with numpy and msgpack alone.

    policy = jaxvla.actor.load("policy-v000012.msgpack")   # verifies format and sha256
    actions = policy.infer(obs)["actions"]                  # [H, A] in [-1, 1]

    broker = jaxvla.actor.ActionChunkBroker(policy, replan=2)
    action = broker.infer(obs)["actions"]                   # [A]: one step of the current chunk

This package imports the standard library, numpy, msgpack and the numpy-only `jaxvla.schema`,
`jaxvla.tokenizer` and `jaxvla.normalization`, nothing else (tests/test_actor.py runs it in a bare
virtualenv). The file format is in `fileformat`, the forward pass in `forward`. On the fleet, a robot runs
`loop.run`: params pulled and verified, episodes run at a fixed rate (`runner`), spooled and pushed
(`client`).

Run robots with `OPENBLAS_NUM_THREADS=1` in the environment (it must be set before numpy is imported):
one observation's matmuls are too small to gain from BLAS threads, and on a busy CPU the threads wait on
each other. Measured on a loaded 2-core machine, the transformer + image model: 1.9 ms per `infer` with
one thread, 104 ms with OpenBLAS's default.
"""

from jaxvla.actor.fileformat import FORMAT_VERSION
from jaxvla.actor.fileformat import PolicyFileError
from jaxvla.actor.fileformat import read_manifest
from jaxvla.actor.policy import INDICATOR_NEGATIVE
from jaxvla.actor.policy import INDICATOR_NONE
from jaxvla.actor.policy import INDICATOR_POSITIVE
from jaxvla.actor.policy import ActionChunkBroker
from jaxvla.actor.policy import Policy
from jaxvla.actor.policy import load
from jaxvla.actor.policy import loads

__all__ = [
    "FORMAT_VERSION",
    "INDICATOR_NEGATIVE",
    "INDICATOR_NONE",
    "INDICATOR_POSITIVE",
    "ActionChunkBroker",
    "Policy",
    "PolicyFileError",
    "load",
    "loads",
    "read_manifest",
]
