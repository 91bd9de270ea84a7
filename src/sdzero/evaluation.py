"""The evaluation loop every method shares: a LightningModule whose ``test_step`` evaluates one sample.

A method subclasses :class:`EvaluationModule`, sets ``self.task`` (a :class:`~sdzero.tasks.Task`:
the records, metric, summary and visuals of its kind of benchmark) and implements :meth:`predict`
(one sample -> one prediction). This base turns each prediction into the task's record, writes its
artifacts and then the record as soon as they are produced (``predictions/rank<k>.jsonl``, flushed),
reuses finished records on resume, times the samples, and writes ``metrics.json`` atomically on
rank 0 at the end. Methods never read or write files.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from sdzero.records import RecordWriter, read_records, write_bytes_atomic, write_json_atomic
from sdzero.tasks import Task

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

    def __init__(self, run_dir: str | None = None, visuals: int = 0) -> None:
        super().__init__()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.visuals = int(visuals)
        self._task: Task | None = None
        self._writer: RecordWriter | None = None
        self._seconds = 0.0
        self._count = 0
        self.random_weights = False
        self.final_metrics: dict[str, Any] | None = None

    @property
    def task(self) -> Task:
        if self._task is None:
            raise RuntimeError(f"{type(self).__name__} has no task yet (set self.task in setup)")
        return self._task

    @task.setter
    def task(self, task: Task) -> None:
        self._task = task
        self.metric = task.metric  # a child module: moved to the device, synced by Lightning

    @property
    def predictions_dir(self) -> Path | None:
        return None if self.run_dir is None else self.run_dir / "predictions"

    # ---------------------------------------------------------------- to implement by the methods
    def predict(self, batch: dict[str, Any]) -> Any:
        """The method's prediction for one sample (the form its task expects)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ the loop
    def on_test_start(self) -> None:
        self._seconds, self._count, self._reused = 0.0, 0, 0
        self._done: dict[int, dict[str, Any]] = {}
        folder = self.predictions_dir
        if folder is not None:
            # every rank reads every rank's records: a resumed run may use another world size
            for path in sorted(folder.glob("*.jsonl")):
                for record in read_records(path):
                    if isinstance(record.get("index"), int) and self.task.record_complete(
                        record, folder
                    ):
                        self._done.setdefault(record["index"], record)
            self._writer = RecordWriter(folder / f"rank{self.global_rank}.jsonl")
            if self._done and self.global_rank == 0:
                log.info("resuming: %d finished samples found in %s", len(self._done), self.run_dir)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        done = self._done.get(int(batch["index"]))
        folder = self.predictions_dir
        if done is not None:  # finished before an interruption: count it, do not redo it
            self._reused += 1
            self.task.update(done, batch, None, folder)
            return
        start = time.perf_counter()
        prediction = self.predict(batch)
        record = self.task.record(batch, prediction)
        seconds = time.perf_counter() - start
        self._seconds += seconds
        self._count += 1
        self.log("seconds_per_sample", seconds, on_step=True, on_epoch=False, batch_size=1)
        if folder is not None:
            for name, data in self.task.artifacts(record, prediction).items():
                write_bytes_atomic(folder / name, data)
        if self._writer is not None:
            self._writer.write(record)
        self.task.update(record, batch, prediction, folder)
        if self.run_dir is not None and batch_idx < self.visuals:
            self._save_visual(record, batch, prediction)

    def _save_visual(self, record: dict[str, Any], batch: dict[str, Any], prediction: Any) -> None:
        image = self.task.visual(record, batch, prediction)
        if image is None:
            return
        visuals = self.run_dir / "visuals"
        visuals.mkdir(parents=True, exist_ok=True)
        path = visuals / f"{record['id']}.png".replace("/", "_")
        image.save(path)
        if _is_wandb(self.logger):
            self.logger.log_image(key="visuals", images=[str(path)], caption=[str(record["id"])])

    def on_test_epoch_end(self) -> None:
        computed = self.task.metric.compute()
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
        summary = self.task.summary({**computed, "seconds_per_sample": seconds_per_sample})
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
        self.task.metric.reset()

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
