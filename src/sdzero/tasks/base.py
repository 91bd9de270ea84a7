"""The interface every task implements (see :mod:`sdzero.tasks`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image
from torchmetrics import Metric


class Task:
    """One kind of benchmark. ``predictions`` below is the run's ``predictions/`` folder (None in
    library use without a run folder); artifacts are written there, next to the records."""

    name: str
    metric: Metric

    def record(self, batch: dict[str, Any], prediction: Any) -> dict[str, Any]:
        """The prediction record of one sample (JSON-serialisable; the contract's schema)."""
        raise NotImplementedError

    def artifacts(self, record: dict[str, Any], prediction: Any) -> dict[str, bytes]:
        """Files that go with the record: ``{path relative to predictions/: bytes}``, written
        (atomically) before the record itself."""
        return {}

    def record_complete(self, record: dict[str, Any], predictions: Path | None) -> bool:
        """Whether a record read back from disk is whole (its artifacts exist)."""
        return True

    def update(
        self,
        record: dict[str, Any],
        batch: dict[str, Any],
        prediction: Any = None,
        predictions: Path | None = None,
    ) -> None:
        """Score one sample; ``prediction`` is None for a record reused from an earlier run."""
        raise NotImplementedError

    def summary(self, computed: dict[str, Any]) -> dict[str, Any]:
        """The task's ``metrics.json`` keys from ``metric.compute()`` plus ``seconds_per_sample``."""
        raise NotImplementedError

    def tables(self, summary: dict[str, Any]) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """Logger tables of a summary: ``{key: (columns, rows)}`` (W&B tables)."""
        return {}

    def visual(
        self, record: dict[str, Any], batch: dict[str, Any], prediction: Any
    ) -> Image.Image | None:
        """A picture of one sample's result, or None."""
        return None
