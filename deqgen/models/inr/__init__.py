"""A deep-equilibrium implicit neural representation (after Huang, Bai, Kolter, NeurIPS 2021, "(Implicit)^2:
Implicit layers for implicit representations"): Fourier features of a pixel's coordinates are injected into a
DEQ cell whose equilibrium is read out as RGB; pixels are independent rows, so the solve is separable. Also an
explicit Fourier-feature MLP with the same parameters.
"""

from deqgen.models.inr.model import (
    DEQINR,
    PRESETS,
    ExplicitMLP,
    FourierFeatures,
    INRCell,
    INRConfig,
    build_inr,
    pixel_grid,
)

__all__ = [
    "DEQINR",
    "PRESETS",
    "ExplicitMLP",
    "FourierFeatures",
    "INRCell",
    "INRConfig",
    "build_inr",
    "pixel_grid",
]
