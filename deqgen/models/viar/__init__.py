"""VIAR: visual implicit autoregressive modelling (arXiv 2605.01220), and VAR, from deqgen parts.

Public names::

    from deqgen.models.viar import build_model, TransformerConfig, ImplicitSpec, PRESETS, preset
    from deqgen.models.viar import MultiScaleVQVAE, VQVAEConfig, VQVAE_PRESETS
    from deqgen.models.viar import generate, EditSpec, Constant, Linear, Explicit, Adaptive, parse_schedule
    from deqgen.models.viar import convert_checkpoint, load_converted, from_pretrained
"""

from deqgen.models.viar.config import PRESETS, ImplicitSpec, TransformerConfig, preset
from deqgen.models.viar.convert import CheckpointError, convert_checkpoint, from_pretrained, load_converted
from deqgen.models.viar.model import NextScaleTransformer, build_model, build_trunk
from deqgen.models.viar.sampling import EditSpec, SampleResult, generate
from deqgen.models.viar.schedules import (
    Adaptive,
    Budget,
    Constant,
    Explicit,
    Linear,
    Schedule,
    parse_schedule,
)
from deqgen.models.viar.vqvae import VQVAE_PRESETS, MultiScaleVQVAE, VQVAEConfig

__all__ = [
    "PRESETS",
    "VQVAE_PRESETS",
    "Adaptive",
    "Budget",
    "CheckpointError",
    "Constant",
    "EditSpec",
    "Explicit",
    "ImplicitSpec",
    "Linear",
    "MultiScaleVQVAE",
    "NextScaleTransformer",
    "SampleResult",
    "Schedule",
    "TransformerConfig",
    "VQVAEConfig",
    "build_model",
    "build_trunk",
    "convert_checkpoint",
    "from_pretrained",
    "generate",
    "load_converted",
    "parse_schedule",
    "preset",
]
