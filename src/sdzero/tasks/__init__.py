"""Tasks: what one kind of benchmark owns, for any method that predicts it.

A task turns a method's prediction for one sample into the contract's prediction record (and its
artifacts, e.g. a mask PNG), scores it with its torchmetrics Metric, summarises the metric as
``metrics.json`` and draws the sample's visual. Methods only predict.
"""

from sdzero.tasks.base import Task

__all__ = ["Task"]
