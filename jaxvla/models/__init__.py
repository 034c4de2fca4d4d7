"""The model library: encoders, the action-chunk policy, the critic ensemble and the distributional value.

Modules are Flax NNX, used functionally: `graphdef, params = nnx.split(model)` outside jit, and
`apply(graphdef, params, ...)` inside, so only plain pytrees cross the jit boundary.
"""

from flax import nnx

from jaxvla.models.config import ModelConfig
from jaxvla.models.config import count_params
from jaxvla.models.heads import INDICATOR_NEGATIVE
from jaxvla.models.heads import INDICATOR_NONE
from jaxvla.models.heads import INDICATOR_POSITIVE
from jaxvla.models.heads import CriticEnsemble
from jaxvla.models.heads import DistributionalValue
from jaxvla.models.heads import Policy
from jaxvla.models.heads import expected_value

__all__ = [
    "INDICATOR_NEGATIVE",
    "INDICATOR_NONE",
    "INDICATOR_POSITIVE",
    "CriticEnsemble",
    "DistributionalValue",
    "ModelConfig",
    "Policy",
    "apply",
    "count_params",
    "expected_value",
]


def apply(graphdef: nnx.GraphDef, params: nnx.State, *args, **kwargs):
    """Calls the module that `graphdef` and `params` describe; the pure form used inside jit."""
    return nnx.merge(graphdef, params)(*args, **kwargs)
