"""The run folder's writers as Lightning callbacks: records and artifacts, resume, metrics, visuals.

An evaluation is ``trainer.test(module)`` with these callbacks (the runner adds them; library users
may too). The method only predicts: its ``test_step`` returns ``{"record", "prediction", "reused"}``
(see :class:`~sdzero.evaluation.EvaluationModule`) and the callbacks do the rest, in this order:

* :class:`PredictionRecords` reads the finished records of an interrupted run back at the start
  (``pl_module.finished``: the samples the method skips) and writes each new sample's artifacts
  and then its record (``predictions/rank<k>.jsonl``, flushed) as soon as it is produced;
* :class:`TaskMetrics` times the samples, scores each one (new or reused) with the task's metric,
  and at the end writes ``metrics.json`` atomically on rank 0 and logs it (W&B tables too);
* :class:`Visuals` draws the first samples of each rank into ``visuals/``.

Lightning's ``BasePredictionWriter`` is the model: one writer, called per batch, owning the disk.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from sdzero.records import RecordWriter, read_records, write_bytes_atomic, write_json_atomic
from sdzero.tasks.viz import stamp_random_weights

log = logging.getLogger(__name__)

RANDOM_WEIGHTS_WARNING = (
    "RANDOM WEIGHTS: this run used a backbone with random weights; its metrics are meaningless and "
    "must never be reported as results."
)


def uses_random_weights(pl_module: Any) -> bool:
    """Whether a method ran on random weights (set by the method as it loads its backbone): the
    one fact behind ``metrics.json``'s ``warning`` and the stamp on the run's pictures."""
    return bool(getattr(pl_module, "random_weights", False))


def predictions_dir(run_dir: str | Path | None) -> Path | None:
    """A run folder's ``predictions/`` (None without a run folder)."""
    return None if run_dir is None else Path(run_dir) / "predictions"


class SampleCallback(pl.Callback):
    """A callback called once per evaluated sample with the method's ``test_step`` output."""

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if outputs.get("padding"):  # a rank without samples runs one padding sample
            return
        if "skipped" in outputs:
            self.on_skipped(trainer, pl_module, outputs)
        else:
            self.on_sample(trainer, pl_module, outputs, batch, batch_idx)

    def on_sample(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``outputs``: ``{"record", "prediction", "reused"}`` of one sample."""

    def on_skipped(self, trainer: pl.Trainer, pl_module: Any, outputs: dict[str, Any]) -> None:
        """``outputs``: ``{"skipped": why, "index", "id"}`` of a sample that could not be read."""


def finished_records(
    folder: Path, task: Any
) -> tuple[dict[int, dict[str, Any]], dict[int, dict[str, Any]]]:
    """The records of a ``predictions/`` folder, every rank's: ``(finished, skipped)``, each
    ``{index: record}``: the first complete record of each sample, and the skip records of samples
    without one. A record the task does not accept as complete (a field of the wrong type, a
    missing artifact) is dropped with a warning: its sample is redone."""
    finished: dict[int, dict[str, Any]] = {}
    skipped: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for record in read_records(path):
            index = record.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                log.warning("%s: a record without an integer index was dropped", path)
            elif "skipped" in record:
                skipped.setdefault(index, record)
            elif index not in finished and not task.record_complete(record, folder):
                log.warning(
                    "%s: the record of sample %d is incomplete or has fields of the wrong type; "
                    "dropped (its sample is redone)",
                    path,
                    index,
                )
            else:
                finished.setdefault(index, record)
    return finished, {i: r for i, r in skipped.items() if i not in finished}


class PredictionRecords(SampleCallback):
    """Writes every sample's artifacts and record as it finishes; on resume, hands the finished
    samples to the module so that it skips them. Every rank reads every rank's records: a resumed
    run may use another world size."""

    def __init__(self, run_dir: str | Path) -> None:
        self.folder = Path(run_dir) / "predictions"
        self._writer: RecordWriter | None = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        finished, _ = finished_records(self.folder, pl_module.task)  # skipped ones are retried
        pl_module.finished = finished
        if finished and trainer.global_rank == 0:
            log.info("resuming: %d finished samples found in %s", len(finished), self.folder)
        self._writer = RecordWriter(self.folder / f"rank{trainer.global_rank}.jsonl")

    def on_sample(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if outputs["reused"]:
            return
        record = outputs["record"]
        for name, data in pl_module.task.artifacts(record, outputs["prediction"]).items():
            write_bytes_atomic(self.folder / name, data)  # before the record that names them
        self._writer.write(record)

    def on_skipped(self, trainer: pl.Trainer, pl_module: Any, outputs: dict[str, Any]) -> None:
        self._writer.write(
            {"index": outputs["index"], "id": str(outputs["id"]), "skipped": outputs["skipped"]}
        )

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class TaskMetrics(SampleCallback):
    """Scores every sample with the task's metric; at the end builds the ``metrics.json`` object
    (:attr:`metrics`), writes it into ``run_dir`` on rank 0 (when given) and logs it.

    ``run_dir`` is also where reused samples' artifacts are read back (segmentation masks)."""

    def __init__(self, run_dir: str | Path | None = None, protocol: str | None = None) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.protocol = protocol
        self.metrics: dict[str, Any] | None = None
        self._start = 0.0

    def on_test_start(self, trainer: pl.Trainer, pl_module: Any) -> None:
        self._seconds, self._count, self._reused, self._skipped = 0.0, 0, 0, 0
        self.metrics = None
        if self.protocol is not None:
            pl_module.task.protocol = self.protocol

    def on_test_batch_start(self, *args: Any, **kwargs: Any) -> None:
        self._start = time.perf_counter()

    def on_sample(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if outputs["reused"]:
            self._reused += 1
        else:
            seconds = time.perf_counter() - self._start
            self._seconds += seconds
            self._count += 1
            pl_module.log("seconds_per_sample", seconds, on_step=True, on_epoch=False, batch_size=1)
        pl_module.task.update(
            outputs["record"], batch, outputs["prediction"], predictions_dir(self.run_dir)
        )

    def on_skipped(self, trainer: pl.Trainer, pl_module: Any, outputs: dict[str, Any]) -> None:
        self._skipped += 1

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        task = pl_module.task
        computed = task.metric.compute()  # synced across ranks by torchmetrics
        log.info(
            "rank %d: %d samples evaluated in %.1f s (%.3f samples/s), %d reused from records",
            trainer.global_rank,
            self._count,
            self._seconds,
            self._count / max(self._seconds, 1e-9),
            self._reused,
        )
        stats = [self._seconds, float(self._count), float(self._skipped)]
        stats = torch.tensor(stats, dtype=torch.float64)
        if trainer.world_size > 1:
            stats = pl_module.all_gather(stats.to(pl_module.device)).reshape(-1, 3).sum(0).cpu()
        seconds_per_sample = float(stats[0] / max(stats[1], 1.0))
        summary = summarise(task, computed, seconds_per_sample, trainer.datamodule, int(stats[2]))
        if uses_random_weights(pl_module):
            summary["warning"] = RANDOM_WEIGHTS_WARNING
        if "note" in summary and trainer.global_rank == 0:
            log.warning(summary["note"])
        self.metrics = summary
        if trainer.global_rank == 0 and self.run_dir is not None:
            write_json_atomic(self.run_dir / "metrics.json", summary)
            charts = task.charts(summary) if hasattr(task, "charts") else {}
            for name, chart in charts.items():  # the task's bar charts, into visuals/
                (self.run_dir / "visuals").mkdir(exist_ok=True)
                chart.save(self.run_dir / "visuals" / name)
                if _is_wandb(pl_module.logger):
                    pl_module.logger.log_image(key=f"charts/{name}", images=[chart])
        if pl_module.logger is not None:
            tabled = set(task.tables(summary))  # logged as tables, not as many scalars
            scalars = {k: v for k, v in summary.items() if k not in tabled}
            flat = {k: v for k, v in _flatten(scalars).items() if isinstance(v, (int, float))}
            pl_module.logger.log_metrics(flat)
            if _is_wandb(pl_module.logger):
                for key, (columns, rows) in task.tables(summary).items():
                    pl_module.logger.log_table(key=key, columns=columns, data=rows)
        task.metric.reset()

    def on_test_end(self, trainer: pl.Trainer, pl_module: Any) -> None:
        if uses_random_weights(pl_module):
            log.warning(RANDOM_WEIGHTS_WARNING)


def summarise(
    task: Any, computed: dict[str, Any], seconds: float | None, datamodule: Any, skipped: int = 0
) -> dict:
    """The ``metrics.json`` object: the task's summary of ``metric.compute()`` plus the dataset's
    name and split size (``seconds``: mean per sample, or None when not measured) and, when some
    samples could not be read (``data.on_bad_sample=skip``), their count ``skipped_samples``."""
    summary = task.summary({**computed, "seconds_per_sample": seconds})
    summary.update(
        dataset=getattr(datamodule, "dataset_name", type(datamodule).__name__),
        split_size=int(getattr(datamodule, "split_size", -1)),
    )
    if skipped:
        summary["skipped_samples"] = skipped
        log.warning(
            "%d samples could not be read and were skipped (data.on_bad_sample=skip); their "
            "records in predictions/ say why",
            skipped,
        )
    unlabelled = computed.get("num_unlabelled_points", 0)
    if unlabelled:  # data.query_points=grid:N
        summary["num_unlabelled_points"] = unlabelled
        summary["note"] = (
            f"{unlabelled} query points have no ground truth (data.query_points): they are "
            f"recorded in predictions/ but not scored; PCK is over the {summary['num_points']} "
            "annotated points only"
        )
    return summary


class Visuals(SampleCallback):
    """A PNG of each of the first ``count`` new samples of every rank in ``run_dir/visuals/``
    (the task draws it; stamped "RANDOM WEIGHTS" when :func:`uses_random_weights`), also logged
    to W&B."""

    def __init__(self, run_dir: str | Path, count: int) -> None:
        self.folder = Path(run_dir) / "visuals"
        self.count = int(count)

    def on_sample(
        self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if outputs["reused"] or batch_idx >= self.count:
            return
        record = outputs["record"]
        image = pl_module.task.visual(record, batch, outputs["prediction"])
        if image is None:
            return
        if uses_random_weights(pl_module):
            image = stamp_random_weights(image)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{portable(str(record['id']))}.png"
        image.save(path)
        if _is_wandb(pl_module.logger):
            pl_module.logger.log_image(
                key="visuals", images=[str(path)], caption=[str(record["id"])]
            )


def portable(name: str) -> str:
    """``name`` as a file name valid on every system: characters other than letters, digits,
    ``.``, ``-`` and ``_`` become ``_`` (SPair pair ids hold ``:``)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def evaluation_callbacks(
    run_dir: str | Path | None, visuals: int = 0, protocol: str | None = None
) -> list[pl.Callback]:
    """The callbacks of an evaluation into ``run_dir`` (None: metrics in memory only);
    ``protocol``: the scoring preset the config applied (named in ``metrics.json``)."""
    metrics = TaskMetrics(run_dir, protocol)
    if run_dir is None:
        return [metrics]
    return [PredictionRecords(run_dir), metrics, Visuals(run_dir, visuals)]


def _is_wandb(logger: Any) -> bool:
    return type(logger).__name__ == "WandbLogger"


def _flatten(obj: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}/"))
        else:
            out[key] = v
    return out
