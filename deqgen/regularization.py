"""Losses and diagnostics on the Jacobian of an implicit layer at its fixed point.

* :func:`jac_reg`: a differentiable per-sample Hutchinson estimate of ``||J_f(z*)||_F^2 / D`` (Bai, Koltun,
  Kolter, ICML 2021, "Stabilizing equilibrium models by Jacobian regularization"). Penalising it keeps ``f``
  contractive, which cuts NFE and stabilises training.
* :func:`spectral_radius`: a per-sample power-method estimate of ``rho(J_f(z*))``; below 1 the fixed-point
  iteration converges locally.
* :func:`fp_correction`: the weighted sum of losses on states along the trajectory (fixed-point correction,
  Bai et al., CVPR 2022, "Deep equilibrium optical flow estimation").

The Jacobian functions take one recorded step ``fz = f(z)`` whose input ``z`` requires grad. An
:class:`~deqgen.layer.ImplicitLayer` built with ``jacobian=True`` returns the gradient method's own recorded
step as ``info.jacobian_step = (fz, z)``, so ``jac_reg(*info.jacobian_step)`` costs no extra evaluation of
``f``; otherwise evaluate one step yourself: ``z = z_star.detach().requires_grad_(); fz = f(z, x, k)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["fp_correction", "jac_reg", "spectral_radius"]


def _check_pair(fz: Tensor, z: Tensor, name: str) -> None:
    if not (isinstance(fz, Tensor) and isinstance(z, Tensor)):
        raise TypeError(f"{name} takes tensors fz = f(z) and z, got {type(fz).__name__}, {type(z).__name__}")
    if fz.shape != z.shape:
        raise ValueError(f"{name}: fz has shape {tuple(fz.shape)} but z has {tuple(z.shape)}; pass fz = f(z)")
    if not z.requires_grad or fz.grad_fn is None:
        raise ValueError(
            f"{name} needs fz = f(z) recorded with z.requires_grad=True (z = z_star.detach().requires_grad_(), "
            "under torch.enable_grad()), or an ImplicitLayer's info.jacobian_step (jacobian=True)"
        )


def _vjp(fz: Tensor, z: Tensor, v: Tensor, create_graph: bool) -> Tensor:
    (vjp,) = torch.autograd.grad(fz, z, v, retain_graph=True, create_graph=create_graph, allow_unused=True)
    return torch.zeros_like(z) if vjp is None else vjp


def jac_reg(fz: Tensor, z: Tensor, *, vecs: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """Per-sample Hutchinson estimate of ``||J||_F^2 / D`` with ``J = d fz / d z`` (``D`` = sample size).

    With ``v ~ N(0, I)``, ``E ||v^T J||^2 = ||J||_F^2``; the estimate averages ``vecs`` draws. The result is
    differentiable (``create_graph``), so ``loss + gamma * jac_reg(...).mean()`` trains ``f`` towards
    contraction.

    Args:
        fz: ``(B, *S)`` one recorded evaluation of ``f`` at ``z``.
        z: ``(B, *S)`` its input, requiring grad.
        vecs: number of random probes, ``>= 1``.
        generator: random source for the probes (on ``z``'s device).

    Returns:
        ``(B,)`` the estimate per sample.

    Example:
        >>> import torch
        >>> z = torch.randn(2, 3, requires_grad=True)
        >>> est = jac_reg(0.5 * z, z, vecs=2000, generator=torch.Generator().manual_seed(0))
        >>> est.shape, bool(((est - 0.25).abs() < 0.03).all())   # J = 0.5 I: ||J||_F^2 / D = 0.25
        (torch.Size([2]), True)
    """
    _check_pair(fz, z, "jac_reg")
    if isinstance(vecs, bool) or not isinstance(vecs, int) or vecs < 1:
        raise ValueError(f"jac_reg got vecs={vecs!r}; use an integer >= 1")
    B = z.shape[0]
    D = z[0].numel()
    total = torch.zeros(B, dtype=z.dtype, device=z.device)
    for _ in range(vecs):
        v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
        total = total + _vjp(fz, z, v, create_graph=True).reshape(B, -1).pow(2).sum(1)
    return total / (vecs * D)


def spectral_radius(
    fz: Tensor, z: Tensor, *, n_iters: int = 100, generator: torch.Generator | None = None
) -> Tensor:
    """Per-sample power-method estimate of the spectral radius of ``J = d fz / d z`` (no graph).

    Iterates ``v <- J^T v / ||J^T v||`` with vector-Jacobian products (``J^T`` has ``J``'s eigenvalues) and
    returns the geometric mean of the last two growth ratios, ``sqrt(||(J^T)^2 v|| / ||v||)``: the power
    method on ``J^2``, whose top eigenvalues are all ``|lambda|^2 >= 0``, so a pair ``a, -b`` with
    ``|a| ~ |b|`` does not make it oscillate. It converges to ``|lambda_max|`` at the rate
    ``(|lambda_2| / |lambda_max|)^2`` per step; a dominant complex pair still makes it oscillate around
    ``|lambda_max|``, so read it as an estimate.

    Args:
        fz: ``(B, *S)`` one recorded evaluation of ``f`` at ``z``.
        z: ``(B, *S)`` its input, requiring grad.
        n_iters: power iterations, ``>= 1`` (each one vector-Jacobian product; at least 2 are made).
        generator: random source for the start vector.

    Returns:
        ``(B,)`` the estimate per sample, detached.
    """
    _check_pair(fz, z, "spectral_radius")
    if isinstance(n_iters, bool) or not isinstance(n_iters, int) or n_iters < 1:
        raise ValueError(f"spectral_radius got n_iters={n_iters!r}; use an integer >= 1")
    B = z.shape[0]
    v = torch.randn(fz.shape, generator=generator, dtype=fz.dtype, device=fz.device)
    v = v / torch.linalg.vector_norm(v.reshape(B, -1), dim=1).view(B, *([1] * (v.dim() - 1)))
    ratios = [torch.zeros(B, dtype=fz.dtype, device=fz.device)] * 2
    for _ in range(max(n_iters, 2)):
        w = _vjp(fz, z, v, create_graph=False).detach()
        ratio = torch.linalg.vector_norm(w.reshape(B, -1), dim=1)
        v = w / ratio.clamp_min(torch.finfo(ratio.dtype).tiny).view(B, *([1] * (w.dim() - 1)))
        ratios = [ratios[1], ratio]
    return (ratios[0] * ratios[1]).sqrt()


def fp_correction(losses: Sequence[Tensor], gamma: float = 0.8) -> Tensor:
    """``sum_i gamma^(n - 1 - i) * losses[i]``: later states weigh more; the last has weight 1.

    Args:
        losses: one loss per trajectory state, in trajectory order (``info.states`` of a layer built with
            ``states=``), scalar tensors or tensors of one shape.
        gamma: decay in ``(0, 1]`` (DEQ-Flow uses 0.8).

    Example:
        >>> import torch
        >>> fp_correction([torch.tensor(1.0), torch.tensor(2.0)], gamma=0.5)
        tensor(2.5000)
    """
    if not losses:
        raise ValueError("fp_correction got no losses; pass one loss per state in info.states")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma <= 1:
        raise ValueError(f"fp_correction got gamma={gamma!r}; use 0 < gamma <= 1")
    n = len(losses)
    total = losses[-1]
    for i, loss in enumerate(losses[:-1]):
        total = total + gamma ** (n - 1 - i) * loss
    return total
