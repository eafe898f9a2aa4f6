"""Errors shared across layers, defined once in the core so every layer may raise and catch them.

:class:`CheckpointError` covers both checkpoint kinds deqgen reads: converted model directories
(:mod:`deqgen.models.viar.convert`) and training checkpoints (:mod:`deqgen.training.checkpoint`). Both modules
re-export it, so ``except CheckpointError`` catches either, whichever module it was imported from.
"""

from __future__ import annotations

__all__ = ["CheckpointError"]


class CheckpointError(ValueError, RuntimeError):
    """A checkpoint or converted model that is missing, incomplete, corrupt or does not match the model.

    The message names the file (and the keys, for a state dict). It is both a ``ValueError`` (bad input
    data, as the converter has always raised) and a ``RuntimeError`` (as the training engine has always
    raised), so handlers written for either keep working.
    """
