"""Label maps whose raw values go through a lookup table (ADE20K, Cityscapes).

A table maps every raw byte value to a label-space index or ``ignore_index``; values the dataset's
format never holds map to :data:`INVALID`, and a map holding one is an error naming the file and the
raw values (a silent 255 would drop pixels from the IoU without anyone noticing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from datamodules.base import LabeledSegmentationDataset
from datamodules.files import DatasetFormatError

INVALID = -1


def lookup_table(mapping: Mapping[int, int]) -> torch.Tensor:
    """``(256,)`` int64: ``mapping[raw]`` for the listed raw values, :data:`INVALID` elsewhere."""
    table = torch.full((256,), INVALID, dtype=torch.int64)
    for raw, value in mapping.items():
        table[raw] = value
    return table


class _UnknownRawValues(Exception):
    def __init__(self, values: list[int]) -> None:
        super().__init__(values)
        self.values = values


class TableLabelDataset(LabeledSegmentationDataset):
    """A dataset whose ``convert_label`` is ``table[raw]``; subclasses set :attr:`table` (before
    ``super().__init__``) and :attr:`raw_format` (what the raw values mean, for the message)."""

    table: torch.Tensor
    raw_format = ""

    def convert_label(self, raw: torch.Tensor) -> torch.Tensor:
        out = self.table[raw]
        bad = out == INVALID
        if bool(bad.any()):
            raise _UnknownRawValues(raw[bad].unique().tolist())
        return out

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            return super().__getitem__(index)
        except _UnknownRawValues as err:
            raise DatasetFormatError(
                f"label {str(self.items[index].label_path)!r} holds raw values "
                f"{err.values[:10]} that {self.name} does not define; expected {self.raw_format}"
            ) from None
