"""An independent small CNN for digit images: the judge of a digits generator (accuracy per class, FID features).

Train it on a split of real digits that the generator never saw (:func:`deqgen.data.split`), then score generated
samples with :func:`class_accuracy` (do they look like the class they were conditioned on?) and use
:meth:`DigitsClassifier.features` as the feature space for :class:`~deqgen.evaluation.fidelity.FeatureFIDMetric`.

Everything is deterministic given the ``torch.Generator``: weights are created on the meta device and initialised
from the generator (the global RNG is never touched), and batches are shuffled with it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from deqgen.files import atomic_file, atomic_write_bytes

__all__ = [
    "DigitsClassifier",
    "DigitsClassifierConfig",
    "class_accuracy",
    "load_digits_classifier",
    "per_class_accuracy",
    "train_digits_classifier",
]

logger = logging.getLogger(__name__)

_MIN_SIDE = 4  # two 2x poolings must leave at least 1 pixel
_CONFIG_FORMAT = "deqgen-digits-classifier-v1"


@dataclass(frozen=True)
class DigitsClassifierConfig:
    """Architecture of :class:`DigitsClassifier`.

    Attributes:
        side: input side ``H`` (images ``(N, 1, H, H)``); 8, 16, 28 and 32 are the tested sizes, any ``>= 4`` works.
        num_classes: output classes.
        width: channels of the first two convolutions (the third has ``2 * width``).
        feature_dim: size of the penultimate features.
    """

    side: int
    num_classes: int = 10
    width: int = 32
    feature_dim: int = 128

    def __post_init__(self) -> None:
        if self.side < _MIN_SIDE:
            raise ValueError(f"DigitsClassifierConfig got side={self.side}; use side >= {_MIN_SIDE}")
        if min(self.num_classes, self.width, self.feature_dim) < 1:
            raise ValueError(f"DigitsClassifierConfig sizes must be positive, got {self}")


class DigitsClassifier(nn.Module):
    """conv-conv-pool-conv-pool-avgpool(2x2)-linear-head; about 62k parameters at the default width, fast on a CPU.

    Args:
        config: the architecture.
        generator: initialises the weights (Kaiming normal, zero biases); ``None`` uses a generator seeded 0.
    """

    def __init__(self, config: DigitsClassifierConfig, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        w = config.width
        # Built on the meta device so construction draws nothing from the global RNG; init_weights fills them.
        with torch.device("meta"):
            self.body = nn.Sequential(
                nn.Conv2d(1, w, 3, padding=1),
                nn.ReLU(),
                nn.Conv2d(w, w, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(w, 2 * w, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.AdaptiveAvgPool2d(2),
                nn.Flatten(),
                nn.Linear(2 * w * 4, config.feature_dim),
                nn.ReLU(),
            )
            self.head = nn.Linear(config.feature_dim, config.num_classes)
        self.to_empty(device="cpu")
        self.init_weights(torch.Generator().manual_seed(0) if generator is None else generator)

    def init_weights(self, generator: torch.Generator) -> None:
        """Kaiming-normal weights (ReLU gain) and zero biases, drawn from ``generator``."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=generator)
                    nn.init.zeros_(module.bias)

    def _check(self, x: Tensor) -> None:
        side = self.config.side
        if x.dim() != 4 or x.shape[1:] != (1, side, side):
            raise ValueError(
                f"DigitsClassifier expects (N, 1, {side}, {side}) images in [-1, 1], got {tuple(x.shape)}"
            )

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features.

        Args:
            x: ``(N, 1, H, H)`` float in ``[-1, 1]``.

        Returns:
            ``(N, feature_dim)`` (post-ReLU), differentiable.
        """
        self._check(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(N, num_classes)`` for images ``x: (N, 1, H, H)``."""
        return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: Tensor, *, batch_size: int = 1024) -> Tensor:
        """Predicted classes ``(N,)`` int64 for ``x: (N, 1, H, H)``, in eval mode and batches, no gradients."""
        self.eval()
        device = next(self.parameters()).device
        return torch.cat([self(b.to(device)).argmax(dim=1).cpu() for b in x.split(batch_size)])

    def save(self, path: str | Path) -> Path:
        """Write weights to ``path`` (safetensors) and the config to ``path`` with suffix ``.json``, atomically.

        Returns:
            ``path``.
        """
        path = Path(path)
        sidecar = _sidecar(path)
        config = {"format": _CONFIG_FORMAT, **asdict(self.config)}
        text = json.dumps(config, indent=2, sort_keys=True).encode()
        atomic_write_bytes(sidecar, text)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        with atomic_file(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": _CONFIG_FORMAT})
        return path

    @classmethod
    def load(cls, path: str | Path) -> DigitsClassifier:
        """Rebuild from the config sidecar and load the weights written by :meth:`save` (CPU, eval mode)."""
        path = Path(path)
        sidecar = _sidecar(path)
        if not path.is_file() or not sidecar.is_file():
            raise FileNotFoundError(
                f"DigitsClassifier.load needs {path} and its config {sidecar}; write both with save()"
            )
        raw = json.loads(sidecar.read_text())
        if raw.pop("format", None) != _CONFIG_FORMAT:
            raise ValueError(f"{sidecar} is not a {_CONFIG_FORMAT} config")
        model = cls(DigitsClassifierConfig(**raw))
        model.load_state_dict(load_file(path))
        return model.eval()


def _sidecar(path: Path) -> Path:
    if path.suffix == ".json":
        raise ValueError(
            f"{path}: the weights path must not end in .json (the config sidecar does); use .safetensors"
        )
    return path.with_suffix(".json")


def load_digits_classifier(path: str | Path) -> DigitsClassifier:
    """Same as :meth:`DigitsClassifier.load`."""
    return DigitsClassifier.load(path)


def _check_data(images: Tensor, labels: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"digit images must be (N, 1, H, H), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}"
        )


def _progress(epochs: int, show: bool | None) -> Iterator[int]:
    """Epoch numbers, under a tqdm bar when tqdm is installed and stderr is a terminal (or ``show=True``)."""
    if show is None:
        show = sys.stderr.isatty()
    if show:
        try:
            from tqdm import tqdm
        except ImportError:
            show = False
        else:
            return iter(tqdm(range(epochs), desc="digits classifier", unit="epoch"))
    return iter(range(epochs))


def train_digits_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 3e-3,
    generator: torch.Generator,
    config: DigitsClassifierConfig | None = None,
    progress: bool | None = None,
) -> DigitsClassifier:
    """Train a :class:`DigitsClassifier` with Adam and cross-entropy on CPU; deterministic given ``generator``.

    Args:
        images: ``(N, 1, H, H)`` float32 in ``[-1, 1]``.
        labels: ``(N,)`` int64.
        epochs: passes over the data.
        batch_size: samples per step (the last, smaller batch of an epoch is kept).
        lr: Adam learning rate (cosine-decayed to 0 over the run).
        generator: draws the initial weights and the per-epoch shuffles.
        config: architecture; default ``DigitsClassifierConfig(side=H, num_classes=max(label) + 1 or 10)``.
        progress: show a tqdm bar (tqdm optional); ``None``: only when stderr is a terminal. Each epoch's loss
            and training accuracy are logged at INFO either way.

    Returns:
        The trained classifier, in eval mode.
    """
    _check_data(images, labels)
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(
            f"train_digits_classifier needs epochs, batch_size >= 1 and lr > 0, got {epochs=} "
            f"{batch_size=} {lr=}"
        )
    if config is None:
        config = DigitsClassifierConfig(side=images.shape[-1], num_classes=max(10, int(labels.max()) + 1))
    model = DigitsClassifier(config, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = -(-images.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    model.train()
    for epoch in _progress(epochs, progress):
        order = torch.randperm(images.shape[0], generator=generator)
        total_loss, correct = 0.0, 0
        for batch in order.split(batch_size):
            x, y = images[batch], labels[batch]
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += int((logits.detach().argmax(dim=1) == y).sum())
        logger.info(
            "digits classifier epoch %d/%d: loss %.4f, train accuracy %.4f",
            epoch + 1,
            epochs,
            total_loss / len(order),
            correct / len(order),
        )
    return model.eval()


def class_accuracy(
    classifier: DigitsClassifier, images: Tensor, labels: Tensor, *, batch_size: int = 1024
) -> float:
    """Fraction of ``images`` (``(N, 1, H, H)``) classified as their ``labels`` (``(N,)`` int64)."""
    _check_data(images, labels)
    return float((classifier.predict(images, batch_size=batch_size) == labels).double().mean())


def per_class_accuracy(
    classifier: DigitsClassifier, images: Tensor, labels: Tensor, *, batch_size: int = 1024
) -> Tensor:
    """Accuracy of each class, ``(num_classes,)`` float64; NaN for classes absent from ``labels``."""
    _check_data(images, labels)
    hits = (classifier.predict(images, batch_size=batch_size) == labels).double()
    k = classifier.config.num_classes
    counts = torch.bincount(labels, minlength=k).double()
    correct = torch.bincount(labels, weights=hits, minlength=k)
    return correct / counts  # 0 / 0 gives NaN for absent classes
