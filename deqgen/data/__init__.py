"""Datasets that work offline (no downloads)."""

from deqgen.data.digits import (
    DigitsData,
    DigitsSourceUnavailableError,
    load_digits,
    mnist5k_path,
    resize,
    split,
)

__all__ = ["DigitsData", "DigitsSourceUnavailableError", "load_digits", "mnist5k_path", "resize", "split"]
