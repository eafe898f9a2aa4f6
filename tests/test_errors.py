"""One ``CheckpointError``: the converter and the training engine raise the same class."""

from __future__ import annotations

import pytest

from deqgen.errors import CheckpointError
from deqgen.models.viar import CheckpointError as ViarCheckpointError
from deqgen.models.viar.convert import CheckpointError as ConvertCheckpointError
from deqgen.training.checkpoint import CheckpointError as TrainingCheckpointError


def test_every_layer_reexports_the_one_class() -> None:
    assert ViarCheckpointError is ConvertCheckpointError is TrainingCheckpointError is CheckpointError


@pytest.mark.parametrize("base", [ValueError, RuntimeError])
def test_handlers_written_for_either_old_base_still_catch_it(base: type[Exception]) -> None:
    with pytest.raises(base, match="names the file"):
        raise CheckpointError("names the file")
