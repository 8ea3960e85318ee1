"""Per-layer precision choices on a target (imports hw_models, nothing of mpsearch)."""

from search_spaces.space import (
    DEFAULT_ACTIVATION_PRECISIONS,
    DEFAULT_WEIGHT_PRECISIONS,
    LayerOptions,
    SearchSpace,
    SpaceError,
)

__all__ = [
    "DEFAULT_ACTIVATION_PRECISIONS",
    "DEFAULT_WEIGHT_PRECISIONS",
    "LayerOptions",
    "SearchSpace",
    "SpaceError",
]
