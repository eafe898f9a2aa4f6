"""The classifier around the multiscale cell: stem, equilibrium (or one explicit pass), head."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqgen.gradients import GradientMethod, GradInfo
from deqgen.layer import ImplicitLayer, States
from deqgen.models.mdeq.cell import MDEQCell, MultiScale
from deqgen.models.mdeq.config import MDEQConfig
from deqgen.nn.dropout import new_solve
from deqgen.solvers.base import Solver

__all__ = ["HEAD_WIDTH", "ExplicitCNN", "MDEQClassifier", "build_classifier", "zero_state"]

HEAD_WIDTH = 4
"""Channel multiplier of the head's 1x1 convolutions."""


def zero_state(config: MDEQConfig, x_BCHW: Tensor) -> MultiScale:
    """The all-zero multiscale state for a batch whose stem output is ``x: (B, C_0, S_0, S_0)``."""
    B, side = x_BCHW.shape[0], x_BCHW.shape[-1]
    out = []
    for c in config.channels:
        out.append(x_BCHW.new_zeros(B, c, side, side))
        side = -(-side // 2)
    return tuple(out)


class _Stem(nn.Sequential):
    """``relu(gn(conv3x3(image)))`` at the highest-resolution branch's side and channels."""

    def __init__(self, config: MDEQConfig) -> None:
        c0 = config.channels[0]
        super().__init__(
            nn.Conv2d(config.in_channels, c0, 3, stride=config.stem_stride, padding=1, bias=False),
            nn.GroupNorm(config.num_groups, c0),
            nn.ReLU(),
        )


class _Head(nn.Module):
    """Per branch a 1x1 convolution to ``HEAD_WIDTH * C_i`` channels and ReLU, then global average pooling,
    concatenation and a linear classifier. (Pooling the GroupNorm-ed state directly would average each group
    to about zero; the ReLU features keep the signal, as HRNet's incremental head modules do.)"""

    def __init__(self, config: MDEQConfig) -> None:
        super().__init__()
        self.expand = nn.ModuleList(nn.Conv2d(c, HEAD_WIDTH * c, 1) for c in config.channels)
        self.fc = nn.Linear(HEAD_WIDTH * sum(config.channels), config.num_classes)

    def forward(self, z: MultiScale) -> Tensor:
        """The multiscale state -> logits ``(B, num_classes)``."""
        pooled = [F.adaptive_avg_pool2d(F.relu(conv(z_i)), 1).flatten(1) for conv, z_i in zip(self.expand, z)]
        return self.fc(torch.cat(pooled, dim=1))  # (B, HEAD_WIDTH * sum C_i) -> (B, K)


class MDEQClassifier(nn.Module):
    """Multiscale DEQ classifier: ``logits = head(z*)`` with ``z* = cell(z*, stem(image))``.

    Args:
        config: the shape.
        layer: the :class:`~deqgen.layer.ImplicitLayer` wrapping an :class:`MDEQCell` of ``config``
            (:func:`build_classifier` makes one).

    Example:
        >>> import torch
        >>> from deqgen import Anderson, JFB
        >>> from deqgen.models.mdeq import PRESETS, build_classifier
        >>> model = build_classifier(PRESETS["tiny"], gradient=JFB(), train_solver=Anderson(tol=1e-3, max_iter=30))
        >>> logits, info = model(torch.randn(2, 1, 12, 12))
        >>> tuple(logits.shape)
        (2, 10)
    """

    def __init__(self, config: MDEQConfig, layer: ImplicitLayer) -> None:
        super().__init__()
        if not isinstance(layer.f, MDEQCell):
            raise TypeError(
                f"MDEQClassifier needs an ImplicitLayer over an MDEQCell, got {type(layer.f).__name__}"
            )
        self.config = config
        self.stem = _Stem(config)
        self.layer = layer
        self.classifier = _Head(config)

    @property
    def cell(self) -> MDEQCell:
        """The DEQ map."""
        return self.layer.f  # type: ignore[return-value]

    def forward(
        self, images_BCHW: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        """``images: (B, in_channels, H, W)`` -> ``(logits (B, num_classes), info)``; ``info.states`` holds the
        trajectory states when the layer was built with ``states=`` (apply :meth:`head` to each)."""
        x_BCHW = self.stem(images_BCHW)  # (B, C_0, S_0, S_0)
        z, info = self.layer(x_BCHW, zero_state(self.config, x_BCHW), generator)
        return self.head(z), info

    def head(self, z: MultiScale) -> Tensor:
        """Logits ``(B, num_classes)`` of a multiscale state (the equilibrium or a trajectory state)."""
        return self.classifier(z)


class ExplicitCNN(nn.Module):
    """The explicit twin of :class:`MDEQClassifier`: the same stem, cell and head (so exactly the same
    parameters), with the cell applied **once** from the zero state instead of solved to equilibrium.

    Args:
        config: the shape.
    """

    def __init__(self, config: MDEQConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = _Stem(config)
        self.cell = MDEQCell(config)
        self.classifier = _Head(config)

    def forward(self, images_BCHW: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, None]:
        """``images: (B, in_channels, H, W)`` -> ``(logits (B, num_classes), None)``."""
        new_solve(self.cell, generator)  # one dropout mask per forward
        x_BCHW = self.stem(images_BCHW)
        z = self.cell(zero_state(self.config, x_BCHW), x_BCHW, 0)
        return self.classifier(z), None


def build_classifier(
    config: MDEQConfig,
    *,
    implicit: bool = True,
    gradient: GradientMethod | None = None,
    train_solver: Solver[Any] | int | None = None,
    eval_solver: Solver[Any] | int | None = None,
    separable: bool = False,
    jacobian: bool = False,
    states: States = None,
    generator: torch.Generator | None = None,
) -> MDEQClassifier | ExplicitCNN:
    """An :class:`MDEQClassifier` (``implicit=True``) or its :class:`ExplicitCNN` twin.

    Args:
        config: the shape.
        implicit: the DEQ, or the one-pass explicit CNN (solver and gradient arguments are then ignored).
        gradient: the DEQ's gradient method (default ``ImplicitLayer``'s).
        train_solver: forward solver in training (or an int fixed budget).
        eval_solver: solver in eval mode (default: ``train_solver``).
        separable: pass the solver only the samples still running (the cell is row-wise; see
            :class:`~deqgen.layer.ImplicitLayer`).
        jacobian: return the recorded step for :func:`~deqgen.regularization.jac_reg` in ``info``.
        states: fixed-point correction states (see :class:`~deqgen.layer.ImplicitLayer`).
        generator: initialises the weights reproducibly (torch's global RNG is left as it was).
    """
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if not implicit:
            return ExplicitCNN(config)
        layer = ImplicitLayer(
            MDEQCell(config),
            gradient,
            train_solver,
            eval_solver if eval_solver is not None else train_solver,
            separable=separable,
            jacobian=jacobian,
            states=states,
        )
        return MDEQClassifier(config, layer)
