"""Hardware side of mpsearch: precisions, layer descriptions, target profiles, cost models.

Imports no torch, Optuna or MLflow: everything else may import it.
"""

from hw_models.cost import Cost, CostModel, LayerCost, bops, weight_bytes
from hw_models.layers import Candidate, LayerChoice, LayerSpec
from hw_models.precision import Precision
from hw_models.profiles import (
    PROFILES,
    ExecRule,
    HardwareProfile,
    UnknownProfileError,
    get_profile,
    list_profiles,
)

__all__ = [
    "PROFILES",
    "Candidate",
    "Cost",
    "CostModel",
    "ExecRule",
    "HardwareProfile",
    "LayerChoice",
    "LayerCost",
    "LayerSpec",
    "Precision",
    "UnknownProfileError",
    "bops",
    "get_profile",
    "list_profiles",
    "weight_bytes",
]
