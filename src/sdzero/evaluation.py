"""The evaluation loop both methods share: a LightningModule whose ``test_step`` evaluates one sample.

A method subclasses :class:`EvaluationModule` and implements :meth:`evaluate` (one sample -> one
prediction record), :meth:`update_metric` (record -> its torchmetrics Metric) and :meth:`summarise`
(the Metric's result -> ``metrics.json``). This base writes each record as soon as it is produced
(``predictions/rank<k>.jsonl``, flushed), times the samples, and writes ``metrics.json`` atomically on
rank 0 at the end. The methods never import each other; they share this file.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torchmetrics import Metric

from sdzero.records import RecordWriter, write_json_atomic

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this run used a backbone with random weights; its metrics are meaningless and "
    "must never be reported as results."
)


class EvaluationModule(pl.LightningModule):
    """Base of the method modules.

    :param run_dir: the run folder (``predictions/``, ``visuals/`` and ``metrics.json`` go there);
        ``None`` keeps everything in memory (library use).
    :param visuals: how many samples (the first ones of each rank) get a PNG in ``visuals/``.
    """

    metric: Metric

    def __init__(self, run_dir: str | None = None, visuals: int = 0) -> None:
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.visuals = int(visuals)
        self._writer: RecordWriter | None = None
        self._seconds = 0.0
        self._count = 0
        self.random_weights = False
        self.final_metrics: dict[str, Any] | None = None

    # ---------------------------------------------------------------- to implement by the methods
    def evaluate(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Evaluate one sample and return its prediction record (JSON-serialisable)."""
        raise NotImplementedError

    def update_metric(self, record: dict[str, Any], batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def summarise(self, computed: dict[str, Any]) -> dict[str, Any]:
        """Turn the metric's result into the ``metrics.json`` object (task-specific keys)."""
        raise NotImplementedError

    def save_visual(self, record: dict[str, Any], batch: dict[str, Any], path: Path) -> None:
        """Write a PNG for this sample (optional)."""

    # ------------------------------------------------------------------------------ the loop
    def on_test_start(self) -> None:
        self._seconds, self._count = 0.0, 0
        if self.run_dir is not None:
            path = self.run_dir / "predictions" / f"rank{self.global_rank}.jsonl"
            self._writer = RecordWriter(path)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        start = time.perf_counter()
        record = self.evaluate(batch)
        self._seconds += time.perf_counter() - start
        self._count += 1
        if self._writer is not None:
            self._writer.write(record)
        self.update_metric(record, batch)
        if self.run_dir is not None and batch_idx < self.visuals:
            visuals = self.run_dir / "visuals"
            visuals.mkdir(parents=True, exist_ok=True)
            self.save_visual(record, batch, visuals / f"{record['id']}.png".replace("/", "_"))

    def on_test_epoch_end(self) -> None:
        computed = self.metric.compute()
        stats = torch.tensor([self._seconds, float(self._count)], dtype=torch.float64)
        stats = (
            self.all_gather(stats).reshape(-1, 2).sum(0) if self.trainer.world_size > 1 else stats
        )
        seconds_per_sample = float(stats[0] / max(stats[1], 1.0))
        summary = self.summarise({**computed, "seconds_per_sample": seconds_per_sample})
        datamodule = self.trainer.datamodule
        summary.update(
            dataset=getattr(datamodule, "dataset_name", type(datamodule).__name__),
            split_size=int(getattr(datamodule, "split_size", -1)),
        )
        if self.random_weights:
            summary["warning"] = RANDOM_WEIGHTS_WARNING
        self.final_metrics = summary
        if self.global_rank == 0 and self.run_dir is not None:
            write_json_atomic(self.run_dir / "metrics.json", summary)
        if self.logger is not None:
            flat = {k: v for k, v in _flatten(summary).items() if isinstance(v, (int, float))}
            self.logger.log_metrics(flat)
        self.metric.reset()

    def on_test_end(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.random_weights:
            log.warning(RANDOM_WEIGHTS_WARNING)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out
