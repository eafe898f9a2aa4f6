"""A multiscale deep-equilibrium classifier (Bai, Koltun, Kolter, NeurIPS 2020, "Multiscale deep equilibrium
models") built only from deqgen parts: a tuple state of feature maps at several resolutions, one residual
block per branch, a fusion step between branches, iteration-consistent dropout and weight normalisation from
:mod:`deqgen.nn`, and a classification head on the equilibrium; plus an explicit CNN of the same parameter count.
"""

from deqgen.models.mdeq.cell import BranchBlock, Fusion, MDEQCell
from deqgen.models.mdeq.config import PRESETS, MDEQConfig
from deqgen.models.mdeq.model import ExplicitCNN, MDEQClassifier, build_classifier

__all__ = [
    "PRESETS",
    "BranchBlock",
    "ExplicitCNN",
    "Fusion",
    "MDEQCell",
    "MDEQClassifier",
    "MDEQConfig",
    "build_classifier",
]
