"""DEQ implicit neural representation: ``rgb(p) = W_out z*(p) + b`` with ``z* = act(W z* + U gamma(p) + c)``.

``gamma(p) = [sin(2 pi B p), cos(2 pi B p)]`` are random Fourier features of the pixel coordinate
``p in [-1, 1]^2`` (Tancik et al., NeurIPS 2020), with ``B ~ N(0, fourier_scale^2)`` drawn once and kept as a
buffer. The injection ``U gamma(p) + c`` is computed once per forward; the cell ``act(W z + u)`` (tanh or
ReLU) is row-wise, so a separable solve stops evaluating each pixel as soon as it converges. ``W`` is
weight-normalised and starts with spectral norm about ``init_scale``, so the first solves converge.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from deqgen.gradients import GradientMethod, GradInfo
from deqgen.layer import ImplicitLayer, States
from deqgen.nn.normalization import weight_norm
from deqgen.solvers.base import Solver

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


@dataclass(frozen=True)
class INRConfig:
    """Shape of :class:`DEQINR` and of its explicit twin.

    Attributes:
        num_frequencies: Fourier frequencies ``F`` (``2F`` features).
        fourier_scale: standard deviation of the frequencies (in cycles per unit of ``p``).
        hidden: width ``H`` of the equilibrium state.
        out_channels: 3 for RGB.
        init_scale: initial spectral norm of ``W`` (below 1: a contraction at initialisation).
        activation: the cell's nonlinearity, ``tanh`` or ``relu`` (both 1-Lipschitz, so ``||W|| < 1`` keeps
            the map a contraction); the explicit twin always uses ReLU.
    """

    num_frequencies: int = 64
    fourier_scale: float = 4.0
    hidden: int = 128
    out_channels: int = 3
    init_scale: float = 0.5
    activation: Literal["tanh", "relu"] = "tanh"

    def __post_init__(self) -> None:
        for name in ("num_frequencies", "hidden", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"INRConfig.{name}={getattr(self, name)}: use an integer >= 1")
        if self.fourier_scale <= 0 or self.init_scale <= 0:
            raise ValueError(
                f"INRConfig: fourier_scale={self.fourier_scale} and init_scale={self.init_scale} must be > 0"
            )
        if self.activation not in ("tanh", "relu"):
            raise ValueError(f"INRConfig.activation={self.activation!r}: use 'tanh' or 'relu'")


#: Named shapes; ``tiny`` is for tests.
PRESETS: dict[str, INRConfig] = {
    "tiny": INRConfig(num_frequencies=8, hidden=16),
    "image": INRConfig(num_frequencies=64, fourier_scale=4.0, hidden=128),
}


def pixel_grid(height: int, width: int) -> Tensor:
    """Pixel-centre coordinates ``(H * W, 2)`` as ``(y, x)`` in ``[-1, 1]``, row-major."""
    ys = (torch.arange(height) + 0.5) / height * 2 - 1
    xs = (torch.arange(width) + 0.5) / width * 2 - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)


class FourierFeatures(nn.Module):
    """``gamma(p) = [sin(2 pi p B^T), cos(2 pi p B^T)]``; ``B: (F, 2)`` is a buffer drawn at construction.

    Args:
        num_frequencies: ``F``.
        scale: standard deviation of ``B``.
        generator: random source for ``B``.
    """

    def __init__(self, num_frequencies: int, scale: float, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_frequencies, 2, generator=generator) * scale)

    def forward(self, coords_N2: Tensor) -> Tensor:
        """``coords: (N, 2)`` -> ``(N, 2F)``."""
        angle = 2 * math.pi * coords_N2 @ self.freqs.T  # (N, F)
        return torch.cat([angle.sin(), angle.cos()], dim=-1)


class INRCell(nn.Module):
    """``f(z, u, k) = act(W z + u)`` on rows ``z: (N, H)``, ``u: (N, H)``; ``W`` weight-normalised.

    Args:
        hidden: ``H``.
        init_scale: initial spectral norm of ``W``.
        activation: ``tanh`` or ``relu``.
    """

    def __init__(self, hidden: int, init_scale: float, activation: Literal["tanh", "relu"] = "tanh") -> None:
        super().__init__()
        self.act = torch.tanh if activation == "tanh" else torch.relu
        self.linear = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            self.linear.weight.mul_(init_scale / torch.linalg.matrix_norm(self.linear.weight, 2))
        weight_norm(self.linear)

    def forward(self, z_NH: Tensor, u_NH: Tensor, k: int = 0) -> Tensor:
        """One step; returns ``(N, H)``."""
        return self.act(self.linear(z_NH) + u_NH)


class DEQINR(nn.Module):
    """The DEQ coordinate network: features, injection, equilibrium, RGB readout.

    Args:
        config: the shape.
        layer: an :class:`~deqgen.layer.ImplicitLayer` over an :class:`INRCell` (see :func:`build_inr`).
        generator: draws the Fourier frequencies.

    Example:
        >>> import torch
        >>> from deqgen import JFB, Picard
        >>> model = build_inr(PRESETS["tiny"], gradient=JFB(), train_solver=Picard(tol=1e-4, max_iter=40))
        >>> rgb, info = model(pixel_grid(4, 6))
        >>> tuple(rgb.shape), bool(info.forward.stats.all_converged)
        ((24, 3), True)
    """

    def __init__(
        self, config: INRConfig, layer: ImplicitLayer, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        if not isinstance(layer.f, INRCell):
            raise TypeError(f"DEQINR needs an ImplicitLayer over an INRCell, got {type(layer.f).__name__}")
        self.config = config
        self.features = FourierFeatures(config.num_frequencies, config.fourier_scale, generator)
        self.inject = nn.Linear(2 * config.num_frequencies, config.hidden)
        self.layer = layer
        self.readout = nn.Linear(config.hidden, config.out_channels)

    def forward(
        self, coords_N2: Tensor, z0_NH: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, GradInfo]:
        """``coords: (N, 2)`` in ``[-1, 1]`` -> ``(rgb (N, out_channels), info)``.

        Args:
            coords_N2: pixel coordinates.
            z0_NH: start of the solve (a previous step's equilibrium of the same pixels warm-starts it, as in
                (Implicit)^2); zeros when None.
            generator: random source of the gradient method.
        """
        u_NH = self.inject(self.features(coords_N2))
        z0 = u_NH.new_zeros(u_NH.shape) if z0_NH is None else z0_NH.detach().to(u_NH.dtype)
        z_NH, info = self.layer(u_NH, z0, generator)
        return self.readout(z_NH), info


class ExplicitMLP(nn.Module):
    """The explicit twin: ``W_out relu(W relu(U gamma(p) + c)) + b`` with the same modules (and parameter count)
    as :class:`DEQINR`: a two-hidden-layer Fourier-feature MLP.

    Args:
        config: the shape.
        generator: draws the Fourier frequencies.
    """

    def __init__(self, config: INRConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.features = FourierFeatures(config.num_frequencies, config.fourier_scale, generator)
        self.inject = nn.Linear(2 * config.num_frequencies, config.hidden)
        self.hidden = weight_norm(nn.Linear(config.hidden, config.hidden, bias=False))
        self.readout = nn.Linear(config.hidden, config.out_channels)

    def forward(
        self, coords_N2: Tensor, z0_NH: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, None]:
        """``coords: (N, 2)`` -> ``(rgb (N, out_channels), None)``; ``z0`` and ``generator`` are unused."""
        h_NH = torch.relu(self.hidden(torch.relu(self.inject(self.features(coords_N2)))))
        return self.readout(h_NH), None


def build_inr(
    config: INRConfig,
    *,
    implicit: bool = True,
    gradient: GradientMethod | None = None,
    train_solver: Solver[Any] | int | None = None,
    eval_solver: Solver[Any] | int | None = None,
    jacobian: bool = False,
    states: States = None,
    generator: torch.Generator | None = None,
) -> DEQINR | ExplicitMLP:
    """A separable :class:`DEQINR` (``implicit=True``) or its :class:`ExplicitMLP` twin.

    Args:
        config: the shape.
        implicit: the DEQ, or the explicit MLP (solver and gradient arguments are then ignored).
        gradient: the DEQ's gradient method.
        train_solver: forward solver in training (or an int fixed budget).
        eval_solver: solver in eval mode (default: ``train_solver``).
        jacobian: return the recorded step for :func:`~deqgen.regularization.jac_reg` in ``info``.
        states: fixed-point correction states (see :class:`~deqgen.layer.ImplicitLayer`).
        generator: draws the frequencies and initialises the weights (torch's global RNG is left as it was).
    """
    seed = None if generator is None else int(torch.randint(2**62, (1,), generator=generator))
    freq_gen = None if generator is None else torch.Generator().manual_seed(seed or 0)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if not implicit:
            return ExplicitMLP(config, freq_gen)
        cell = INRCell(config.hidden, config.init_scale, config.activation)
        layer = ImplicitLayer(
            cell,
            gradient,
            train_solver,
            eval_solver if eval_solver is not None else train_solver,
            separable=True,
            jacobian=jacobian,
            states=states,
        )
        return DEQINR(config, layer, freq_gen)
