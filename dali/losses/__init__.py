"""Distribution-alignment losses: pure functions, plus the one stateful scorer module."""

from dali.losses.attentive import AttentiveTokenWeights, TokenWeights, categorical_entropy
from dali.losses.mmd import mmd_loss
from dali.losses.ot import ot_loss, sinkhorn_cost, squared_euclidean_cost

__all__ = [
    "AttentiveTokenWeights",
    "TokenWeights",
    "categorical_entropy",
    "mmd_loss",
    "ot_loss",
    "sinkhorn_cost",
    "squared_euclidean_cost",
]
