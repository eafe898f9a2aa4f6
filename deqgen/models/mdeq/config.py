"""The shape of a multiscale DEQ classifier: a frozen dataclass, and named presets."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PRESETS", "MDEQConfig"]


@dataclass(frozen=True)
class MDEQConfig:
    """Shape of :class:`~deqgen.models.mdeq.MDEQClassifier` (and of its explicit twin).

    Attributes:
        in_channels: image channels (1 for digits).
        image_size: side of the (square) input images.
        num_classes: classes of the head.
        channels: channels per branch, highest resolution first; branch ``i`` has side
            ``ceil(image_size / (stem_stride * 2**i))``. Two or three branches, as in MDEQ.
        num_groups: GroupNorm groups; must divide every entry of ``channels``.
        stem_stride: stride of the stem convolution (1 or 2).
        dropout: iteration-consistent channel dropout inside each branch block (training only).
        weight_norm: weight-normalise every convolution of the cell.
        init_scale: factor on the initial weight of each block's second convolution; below about 1 the cell
            is a contraction at initialisation, so the first solves converge.
    """

    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    channels: tuple[int, ...] = (16, 32)
    num_groups: int = 4
    stem_stride: int = 2
    dropout: float = 0.0
    weight_norm: bool = True
    init_scale: float = 0.2

    def __post_init__(self) -> None:
        if not 1 <= len(self.channels) <= 3:
            raise ValueError(f"MDEQConfig.channels={self.channels}: use 1 to 3 branches, e.g. (16, 32)")
        for c in self.channels:
            if c < 1 or c % self.num_groups:
                raise ValueError(
                    f"MDEQConfig.channels={self.channels}: every entry must be a positive multiple of "
                    f"num_groups={self.num_groups}"
                )
        if self.stem_stride not in (1, 2):
            raise ValueError(f"MDEQConfig.stem_stride={self.stem_stride}: use 1 or 2")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MDEQConfig.dropout={self.dropout}: use 0 <= dropout < 1")
        if self.image_size < 2 ** len(self.channels):
            raise ValueError(
                f"MDEQConfig.image_size={self.image_size} is too small for {len(self.channels)} branches"
            )

    @property
    def sides(self) -> tuple[int, ...]:
        """Spatial side of each branch, highest resolution first."""
        side = -(-self.image_size // self.stem_stride)
        out = []
        for _ in self.channels:
            out.append(side)
            side = -(-side // 2)  # a 3x3 stride-2 convolution with padding 1
        return tuple(out)


#: Named shapes; ``tiny`` is for tests.
PRESETS: dict[str, MDEQConfig] = {
    "tiny": MDEQConfig(channels=(8, 16), num_groups=4, image_size=12),
    "digits": MDEQConfig(channels=(16, 32), num_groups=4, dropout=0.05),
    "digits3": MDEQConfig(channels=(16, 32, 64), num_groups=4, dropout=0.05),
}
