"""Compile readiness: ``torch._dynamo.explain`` finds no graph break in the model code paths that should
trace whole (attention kernels resolved once, labels checked without a host sync)."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
import torch._dynamo as dynamo

from deqgen import Picard
from deqgen.models.viar.model import build_model
from deqgen.models.viar.trunk import ImplicitInput


def _explain(fn, *args):  # type: ignore[no-untyped-def]
    dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's own deprecation/perf warnings are not what is tested
        out = dynamo.explain(fn)(*args)
    dynamo.reset()
    return out


def _model(name: str):  # type: ignore[no-untyped-def]
    m = build_model(name, generator=torch.Generator().manual_seed(0)).eval()
    m.prepare_attention("cpu", torch.float32)
    return m


def _inputs(m):  # type: ignore[no-untyped-def]
    labels = torch.arange(3) % m.num_classes
    feats = torch.randn(
        3,
        m.cfg.seq_len - m.cfg.patch_nums[0] ** 2,
        m.cfg.z_channels,
        generator=torch.Generator().manual_seed(1),
    )
    return labels, feats


def _reasons(ex) -> list[str]:  # type: ignore[no-untyped-def]
    return [
        f"{r.reason.splitlines()[0]} at {r.user_stack[-1] if r.user_stack else '?'}" for r in ex.break_reasons
    ]


def test_var_teacher_forced_forward_is_one_graph() -> None:
    m = _model("var_tiny")
    ex = _explain(lambda lab, f: m(lab, f)[0], *_inputs(m))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), _reasons(ex)


def test_one_implicit_iteration_is_one_graph() -> None:
    m = _model("viar_tiny")
    labels, _ = _inputs(m)
    u = torch.randn(3, m.cfg.seq_len, m.cfg.width, generator=torch.Generator().manual_seed(2))
    x = ImplicitInput(u=u, cond=m.class_emb(labels), mask=m.attn_bias.to(u.dtype))
    ex = _explain(lambda z: m.trunk.map(z, x, 0), torch.randn_like(u))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), _reasons(ex)


def test_viar_teacher_forced_forward_with_a_fixed_budget_is_one_graph() -> None:
    m = _model("viar_tiny")
    m.trunk.implicit.eval_solver = Picard(tol=None, max_iter=3)
    ex = _explain(lambda lab, f: m(lab, f)[0], *_inputs(m))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), _reasons(ex)


def test_label_check_survives_compile_as_a_device_assertion() -> None:
    m = _model("var_tiny")
    labels, feats = _inputs(m)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        m(torch.tensor([0, 11, 2]), feats)  # eager on the CPU: a plain ValueError
    ex = _explain(lambda lab: m.condition(lab), labels)
    assert ex.graph_break_count == 0, _reasons(ex)


def test_attention_resolves_once_per_input_kind(monkeypatch: pytest.MonkeyPatch) -> None:
    A = importlib.import_module("deqgen.nn.attention")  # the package re-exports a function of that name

    calls = []
    real = A.resolve_backend

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs["mask_kind"])
        return real(*args, **kwargs)

    monkeypatch.setattr(A, "resolve_backend", counting)
    m = build_model("var_tiny", generator=torch.Generator().manual_seed(0)).eval()
    labels, feats = _inputs(m)
    with torch.no_grad():
        for _ in range(3):
            m(labels, feats)
    # one resolution per block for the float (block-causal) mask, none on the second and third calls
    assert calls == ["float"] * len(m.blocks())


def test_a_model_compiled_before_any_resolution_still_traces_whole() -> None:
    """Without prepare_attention the first traced call must not probe (it would break the graph)."""
    m = build_model("var_tiny", generator=torch.Generator().manual_seed(0)).eval()
    ex = _explain(lambda lab, f: m(lab, f)[0], *_inputs(m))
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), _reasons(ex)
