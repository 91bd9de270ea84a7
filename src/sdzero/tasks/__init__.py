"""Tasks: what one kind of benchmark owns, for any method that predicts it.

A task turns a method's prediction for one sample into the contract's prediction record (and its
artifacts, e.g. a mask PNG), scores it with its torchmetrics Metric, summarises the metric as
``metrics.json`` and draws the sample's visual. Methods only predict.

``Task`` is imported on first use, so that ``sdzero.tasks.protocols`` (read while a config is
composed) loads without torchmetrics.
"""

from typing import Any

__all__ = ["Task"]


def __getattr__(name: str) -> Any:
    if name == "Task":
        from sdzero.tasks.base import Task

        return Task
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
