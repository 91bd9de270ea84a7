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

from sdzero.records import RecordWriter, read_records, write_json_atomic

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
    def record_complete(self, record: dict[str, Any]) -> bool:
        """Whether a record read back from disk is whole (e.g. its mask file exists)."""
        return True

    def on_test_start(self) -> None:
        self._seconds, self._count, self._reused = 0.0, 0, 0
        self._done: dict[int, dict[str, Any]] = {}
        if self.run_dir is not None:
            # every rank reads every rank's records: a resumed run may use another world size
            for path in sorted((self.run_dir / "predictions").glob("*.jsonl")):
                for record in read_records(path):
                    if isinstance(record.get("index"), int) and self.record_complete(record):
                        self._done.setdefault(record["index"], record)
            path = self.run_dir / "predictions" / f"rank{self.global_rank}.jsonl"
            self._writer = RecordWriter(path)
            if self._done and self.global_rank == 0:
                log.info("resuming: %d finished samples found in %s", len(self._done), self.run_dir)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        done = self._done.get(int(batch["index"]))
        if done is not None:  # finished before an interruption: count it, do not redo it
            self._reused += 1
            self.update_metric(done, batch)
            return
        start = time.perf_counter()
        record = self.evaluate(batch)
        seconds = time.perf_counter() - start
        self._seconds += seconds
        self._count += 1
        self.log("seconds_per_sample", seconds, on_step=True, on_epoch=False, batch_size=1)
        if self._writer is not None:
            self._writer.write(record)
        self.update_metric(record, batch)
        if self.run_dir is not None and batch_idx < self.visuals:
            visuals = self.run_dir / "visuals"
            visuals.mkdir(parents=True, exist_ok=True)
            path = visuals / f"{record['id']}.png".replace("/", "_")
            self.save_visual(record, batch, path)
            if path.is_file() and _is_wandb(self.logger):
                self.logger.log_image(
                    key="visuals", images=[str(path)], caption=[str(record["id"])]
                )

    def on_test_epoch_end(self) -> None:
        computed = self.metric.compute()
        log.info(
            "rank %d: %d samples evaluated in %.1f s (%.3f samples/s), %d reused from records",
            self.global_rank,
            self._count,
            self._seconds,
            self._count / max(self._seconds, 1e-9),
            self._reused,
        )
        stats = torch.tensor([self._seconds, float(self._count)], dtype=torch.float64)
        if self.trainer.world_size > 1:
            stats = self.all_gather(stats.to(self.device)).reshape(-1, 2).sum(0).cpu()
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
            if _is_wandb(self.logger):
                _log_tables(self.logger, summary)
        self.metric.reset()

    def on_test_end(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self.random_weights:
            log.warning(RANDOM_WEIGHTS_WARNING)


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def _log_tables(logger: Any, summary: dict[str, Any]) -> None:
    """Per-category / per-class results as W&B tables (one row per name)."""
    for key in ("per_category", "per_class_iou"):
        table = summary.get(key)
        if not table:
            continue
        first = next(iter(table.values()))
        columns = ["name", *(first.keys() if isinstance(first, dict) else ["iou"])]
        rows = [[name, *(v.values() if isinstance(v, dict) else [v])] for name, v in table.items()]
        logger.log_table(key=key, columns=columns, data=rows)


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out
