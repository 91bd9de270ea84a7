"""The evaluation step every method shares: a LightningModule whose ``test_step`` predicts one sample.

A method subclasses :class:`EvaluationModule`, sets ``self.task`` (a :class:`~sdzero.tasks.Task`:
the records, metric, summary and visuals of its kind of benchmark) and implements :meth:`predict`
(one sample -> one prediction). ``test_step`` turns the prediction into the task's record and
returns ``{"record", "prediction", "reused"}``; the callbacks of :mod:`sdzero.callbacks` write it,
score it and summarise the run. Methods never read or write files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytorch_lightning as pl

from sdzero.tasks import Task


@dataclass(frozen=True)
class SmokeTest:
    """How the method contract suite (``tests/test_method_contract.py``) runs a method test-sized:
    ``experiment`` (synthetic data, tiny backbone) with ``overrides`` that make it small, and
    ``batching``: override sets that change only how work is batched (each must give the
    reference run's records exactly)."""

    experiment: str
    overrides: tuple[str, ...] = ()
    batching: tuple[tuple[str, ...], ...] = ()


class EvaluationModule(pl.LightningModule):
    """Base of the method modules.

    ``finished`` maps dataset indices to records of samples finished before an interruption
    (set by :class:`~sdzero.callbacks.PredictionRecords` on resume): they are not predicted again,
    their record is passed on with ``prediction=None``. ``random_weights`` is set by a method
    whose backbone has random weights (the summary then carries a loud warning).

    A method registers by a ``configs/method/<name>.yaml`` naming it and declares ``smoke_test``,
    which the contract suite runs (batching, DDP, resume, recomputable metrics, early errors).
    """

    smoke_test: ClassVar[SmokeTest | None] = None

    def __init__(self) -> None:
        super().__init__()
        self._task: Task | None = None
        self.finished: dict[int, dict[str, Any]] = {}
        self.random_weights = False

    @property
    def task(self) -> Task:
        if self._task is None:
            raise RuntimeError(f"{type(self).__name__} has no task yet (set self.task in setup)")
        return self._task

    @task.setter
    def task(self, task: Task) -> None:
        self._task = task
        self.metric = task.metric  # a child module: moved to the device, synced by Lightning

    def requirements(self) -> list[Any]:
        """What the method will load besides its config (packages, weights): a list of
        :class:`~sdzero.requirements.Requirement`, checked before anything loads (none here)."""
        return []

    def make_task(self, datamodule: Any) -> Task:
        """The task scoring this method on ``datamodule`` (cheap: loads no model; a
        :class:`~sdzero.errors.ConfigError` if the datamodule is of the wrong kind)."""
        raise NotImplementedError

    def setup(self, stage: str) -> None:
        """Under a Trainer's test loop, build the task (subclasses then load their models)."""
        if self._trainer is not None and stage == "test":
            self.task = self.make_task(self.trainer.datamodule)

    def predict(self, batch: dict[str, Any]) -> Any:
        """The method's prediction for one sample (the form its task expects)."""
        raise NotImplementedError

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """``{"record": the task's record, "prediction": the method's output (None when reused),
        "reused": whether the record was finished before}``; ``{"skipped": why, "index", "id"}``
        for a sample the datamodule could not read (``data.on_bad_sample=skip``)."""
        if batch.get("padding"):  # see datamodules.sharding: contributes nothing
            return {"padding": True}
        if "skipped" in batch:  # unreadable files under data.on_bad_sample=skip
            return {"skipped": batch["skipped"], "index": int(batch["index"]), "id": batch["id"]}
        done = self.finished.get(int(batch["index"]))
        if done is not None:
            return {"record": done, "prediction": None, "reused": True}
        prediction = self.predict(batch)
        return {
            "record": self.task.record(batch, prediction),
            "prediction": prediction,
            "reused": False,
        }
