"""Pseudo-labels: the training pairs of ``sdzero train`` read from the records of finished sdzero runs.

``data=spair_pseudo_labels data.runs=[RUN_DIR, ...]`` (or ``cub_pseudo_labels``) is the benchmark's
datamodule (its test split evaluated, its ``val_split`` validated on with ground truth) whose
training pairs are the pairs the runs evaluated, each labelled by its records:

* ``data.labels=pseudo`` (default): a source point's label is the run's predicted target point.
  Only query points without ground truth (a run with ``data.query_points=grid:N``) give labels
  unless ``data.use_keypoints=true`` (predictions at annotated source keypoints use where the
  annotators put them: weak supervision);
* ``data.labels=ground_truth``: the annotated target keypoints of the same records (the
  supervised row of the same loop, on the same pairs).

Filters (:mod:`datamodules.label_filters`), each counted as it drops labels (the counts are
logged and kept in :attr:`PseudoLabels.label_counts`): a label outside the target image;
``data.min_confidence`` (records that carry a per-point ``confidence``); ``data.cycle_alpha``
(cycle consistency: needs, for each run, a run of the same pairs in the other direction,
``data.reverse=true``; a label is kept when the reverse run's prediction at the nearest reverse
query lands within ``cycle_alpha`` times the source image's longer side of its source point);
``data.max_per_pair`` (a keyed random subset).

Provenance comes from each run folder's ``config.yaml``: its ``data`` node names the dataset and
split (a datamodule without a ``split`` key evaluates its test split), ``method`` the method,
``backbone`` the backbone. Records of a test split (``test``, or this datamodule's own evaluated
``split``) are refused; runs that differ in dataset, split, method or backbone, and runs on this
datamodule's ``val_split``, are flagged (``data.mixed_runs=warn``: logged; ``error``: refused).
Every check runs in ``setup("fit")``, before any model is built.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import Dataset

from datamodules.base import BenchmarkDataModule, LimitedDataset
from datamodules.cub import CUBDataModule
from datamodules.files import DatasetFormatError
from datamodules.label_filters import DropCounts, confident, cycle_consistent, inside, keyed_subset
from datamodules.spair import SPairDataModule
from sdzero.errors import ConfigError, MissingFileError
from sdzero.records import read_records

log = logging.getLogger(__name__)

LABELS = ("pseudo", "ground_truth")
MIXED_RUNS = ("warn", "error")
PAIRS_UNCHANGED_BY = (
    "query_points",
    "reverse",
    "limit",
    "num_workers",
    "batch_size",
    "train_split",
    "val_split",
    "train_limit",
)
"""Data keys that change neither which pairs a split holds nor their order."""
RECORD_FIELDS = ("index", "id", "src_kps", "trg_kps", "pred_kps", "src_size", "trg_size")


@dataclass
class TeacherRun:
    """One finished run: its folder, provenance (from ``config.yaml``) and records by index."""

    path: Path
    data: dict[str, Any]
    method: str
    backbone: dict[str, Any]
    records: dict[int, dict[str, Any]]
    dataset: Any = field(default=None, repr=False)  # the split it evaluated (set by load_pairs)

    @property
    def split(self) -> str:
        return str(self.data.get("split", "test"))

    @property
    def reverse(self) -> bool:
        return bool(self.data.get("reverse", False))

    @property
    def pairs(self) -> str:
        """Identity of the run's pair list: its data node without :data:`PAIRS_UNCHANGED_BY`."""
        kept = {k: v for k, v in self.data.items() if k not in PAIRS_UNCHANGED_BY}
        return json.dumps(kept, sort_keys=True, default=str)


def read_run(path: str | Path) -> TeacherRun:
    """A run folder's provenance and records; a one-line error naming ``data.runs`` and the file
    when it is not the folder of a finished sdzero correspondence run."""
    path = Path(path).expanduser()
    config = path / "config.yaml"
    if not config.is_file():
        raise MissingFileError(
            f"data.runs: {str(path)!r} has no config.yaml; expected the folder of a finished "
            "sdzero run"
        )
    cfg = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    for group in ("data", "method"):
        if not isinstance(cfg.get(group), dict) or "_target_" not in cfg[group]:
            raise ConfigError(
                f"data.runs: {str(config)!r} names no {group} (_target_); records must say which "
                "dataset, split and method made them"
            )
    records: dict[int, dict[str, Any]] = {}
    for file in sorted((path / "predictions").glob("*.jsonl")):
        for record in read_records(file):
            missing = [k for k in RECORD_FIELDS if k not in record]
            if missing:
                raise DatasetFormatError(
                    f"data.runs: a record in {str(file)!r} lacks {missing}; expected "
                    "correspondence records"
                )
            records.setdefault(int(record["index"]), record)
    if not records:
        raise MissingFileError(f"data.runs: {str(path / 'predictions')!r} holds no records")
    method = str((cfg.get("choices") or {}).get("method") or cfg["method"]["_target_"])
    return TeacherRun(path, cfg["data"], method, dict(cfg.get("backbone") or {}), records)


def _flag(message: str, mixed_runs: str) -> None:
    if mixed_runs == "error":
        raise ConfigError(f"{message} (data.mixed_runs=error)")
    log.warning("%s", message)


class LabelledPairs(Dataset):
    """Training samples: a run's pair as it ran (its direction) with the kept labels as
    ``src_kps`` / ``trg_kps`` ``(K, 2)`` float32 original pixels (``extra`` emptied: its keypoint
    ids describe the annotated points)."""

    def __init__(self, items: list[tuple[Any, int, torch.Tensor, torch.Tensor]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        dataset, index, src, trg = self.items[i]
        sample = dataset[index]
        sample.update(src_kps=src.float(), trg_kps=trg.float(), extra={})
        return sample


class PseudoLabels:
    """The pseudo-label behaviour, mixed into a trainable benchmark datamodule (see the module
    docstring); the benchmark's own keyword arguments pass through.

    :param runs: run folders whose records label the training pairs (``data.runs``).
    :param labels: ``pseudo`` | ``ground_truth``.
    :param use_keypoints: with ``pseudo``, also label at annotated source keypoints.
    :param cycle_alpha: cycle-consistency tolerance (fraction of the source's longer side), or None.
    :param min_confidence: keep labels whose record ``confidence`` reaches this, or None.
    :param max_per_pair: keep at most this many labels per pair (keyed random subset), or None.
    :param mixed_runs: ``warn`` | ``error``: what flagged provenance differences do.
    """

    def __init__(
        self,
        *args: Any,
        runs: list[str] | tuple[str, ...] = (),
        labels: str = "pseudo",
        use_keypoints: bool = False,
        cycle_alpha: float | None = None,
        min_confidence: float | None = None,
        max_per_pair: int | None = None,
        mixed_runs: str = "warn",
        **benchmark: Any,
    ) -> None:
        super().__init__(*args, **benchmark)
        if isinstance(runs, str):
            raise ConfigError(f"data.runs must be a list of run folders, got the string {runs!r}")
        if labels not in LABELS:
            raise ConfigError(f"data.labels must be one of {list(LABELS)}, got {labels!r}")
        if mixed_runs not in MIXED_RUNS:
            raise ConfigError(
                f"data.mixed_runs must be one of {list(MIXED_RUNS)}, got {mixed_runs!r}"
            )
        if cycle_alpha is not None and not cycle_alpha > 0:
            raise ConfigError(f"data.cycle_alpha must be > 0 or null, got {cycle_alpha!r}")
        if max_per_pair is not None and (isinstance(max_per_pair, bool) or max_per_pair < 1):
            raise ConfigError(
                f"data.max_per_pair must be a positive integer or null, got {max_per_pair!r}"
            )
        if labels == "ground_truth" and (cycle_alpha is not None or min_confidence is not None):
            raise ConfigError(
                "data.cycle_alpha / data.min_confidence filter predictions; with "
                "data.labels=ground_truth set them to null"
            )
        self.runs, self.labels, self.use_keypoints = [str(r) for r in runs], labels, use_keypoints
        self.cycle_alpha, self.min_confidence = cycle_alpha, min_confidence
        self.max_per_pair, self.mixed_runs = max_per_pair, mixed_runs
        self.label_counts = DropCounts()

    def setup(self, stage: str | None = None) -> None:
        """The runs are read and checked first (cheap, before the benchmark's files), then the
        test split, then (``fit``) the labelled pairs and the validation split."""
        if stage == "fit" and self.train_set is None:
            runs = self.check_runs([read_run(r) for r in self.runs])
        BenchmarkDataModule.setup(self, stage)
        if stage != "fit" or self.train_set is not None:
            return
        self.train_set = LimitedDataset(self.labelled_pairs(runs), self.train_limit)
        if self.val_split is not None:
            self.val_set = self._split(self.val_split, "val_split")

    def check_runs(self, runs: list[TeacherRun]) -> list[TeacherRun]:
        """Refuse test-split records; flag runs that differ (see the module docstring)."""
        if not runs:
            raise ConfigError(
                "data.runs: name at least one run folder whose records label the pairs"
            )
        test_splits = {"test", str(getattr(self, "split", "test"))}
        for run in runs:
            if run.split in test_splits:
                raise ConfigError(
                    f"data.runs: {str(run.path)!r} evaluated the {run.split!r} split; training on "
                    "test-split records is refused (run the teacher on a training split, e.g. "
                    "data.split=trn)"
                )
            if run.split == self.val_split:
                _flag(
                    f"data.runs: {str(run.path)!r} labels the {run.split!r} split, which "
                    "data.val_split validates on",
                    self.mixed_runs,
                )
        first = runs[0]
        for run in runs[1:]:
            for what, a, b in (
                ("dataset", first.data["_target_"], run.data["_target_"]),
                ("split", first.split, run.split),
                ("method", first.method, run.method),
                ("backbone", first.backbone, run.backbone),
            ):
                if a != b:
                    _flag(
                        f"data.runs: {str(run.path)!r} has another {what} than "
                        f"{str(first.path)!r} ({b!r} vs {a!r})",
                        self.mixed_runs,
                    )
        return runs

    def _load(self, run: TeacherRun) -> None:
        """Build the split the run evaluated (its own root, else this datamodule's) and check that
        every record's index still names the pair it names."""
        from sdzero.config import instantiate

        node = dict(run.data)
        if not Path(str(node.get("root"))).expanduser().is_dir():
            node["root"] = self.root
        datamodule = instantiate(node, key=f"data of run {run.path}")
        datamodule.setup("test")
        run.dataset = datamodule.dataset
        for index, record in run.records.items():
            pairs = run.dataset.pairs
            if not 0 <= index < len(run.dataset) or pairs[index].id != record["id"]:
                found = pairs[index].id if 0 <= index < len(run.dataset) else "no pair"
                raise DatasetFormatError(
                    f"data.runs: {str(run.path)!r} record {index} is pair {record['id']!r} but "
                    f"that split's pair {index} is {found!r} now; the dataset changed since the run"
                )

    def labelled_pairs(self, runs: list[TeacherRun]) -> LabelledPairs:
        """The runs' pairs with their filtered labels; :attr:`label_counts` counts the drops."""
        partners: dict[int, TeacherRun] = {}
        if self.cycle_alpha is not None:
            for number, run in enumerate(runs):
                other = [r for r in runs if r.pairs == run.pairs and r.reverse != run.reverse]
                if not other:
                    raise ConfigError(
                        f"data.cycle_alpha needs each run's other direction: {str(run.path)!r} "
                        f"(reverse={str(run.reverse).lower()}) has no run of the same pairs with "
                        f"data.reverse={str(not run.reverse).lower()} in data.runs"
                    )
                partners[number] = other[0]
        items = []
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        counts = self.label_counts = DropCounts()
        for run in runs:
            self._load(run)
        for number, run in enumerate(runs):
            for index in sorted(run.records):
                record = run.records[index]
                back = partners.get(number)
                src, trg, keep = self._labels(record, back.records.get(index) if back else None)
                if self.max_per_pair is not None:
                    limited = keyed_subset(keep, self.max_per_pair, seed, number, index)
                    keep = counts.drop("max_per_pair", keep, limited)
                if keep.any():
                    items.append((run.dataset, index, src[keep], trg[keep]))
                    counts["kept"] += int(keep.sum())
                    counts["pairs"] += 1
        log.info("pseudo-labels from %d runs: %s", len(runs), counts.summary())
        if not items:
            raise ConfigError(
                f"data.runs: no label is left ({counts.summary()}); a pseudo-label run needs "
                "query points without ground truth (data.query_points=grid:N), or set "
                "data.use_keypoints=true"
            )
        return LabelledPairs(items)

    def _labels(
        self, record: dict[str, Any], back: dict[str, Any] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A record's source points, labels and the ``(K,)`` mask of those kept by the filters
        (in :data:`~datamodules.label_filters.FILTERS` order but ``max_per_pair``)."""
        counts = self.label_counts
        src = torch.tensor(record["src_kps"], dtype=torch.float64).reshape(-1, 2)
        truth = torch.tensor(record["trg_kps"], dtype=torch.float64).reshape(-1, 2)
        pred = torch.tensor(record["pred_kps"], dtype=torch.float64).reshape(-1, 2)
        annotated = ~torch.isnan(truth).all(dim=1)
        trg = truth if self.labels == "ground_truth" else pred
        keep = torch.ones(len(src), dtype=torch.bool)
        keep = counts.drop("no_label", keep, torch.isfinite(trg).all(dim=1))
        if self.labels == "pseudo" and not self.use_keypoints:
            keep = counts.drop("annotated", keep, ~annotated)
        keep = counts.drop("outside", keep, inside(trg, tuple(record["trg_size"])))
        if self.min_confidence is not None:
            if "confidence" not in record:
                raise ConfigError(
                    "data.min_confidence: the records carry no per-point 'confidence' (record "
                    f"{record['index']} of a run of this method); set data.min_confidence=null"
                )
            confidence = torch.tensor(record["confidence"], dtype=torch.float64).reshape(-1)
            keep = counts.drop("confidence", keep, confident(confidence, self.min_confidence))
        if self.cycle_alpha is not None:
            consistent = torch.zeros(len(src), dtype=torch.bool)
            if back is not None:
                back_src = torch.tensor(back["src_kps"], dtype=torch.float64).reshape(-1, 2)
                back_pred = torch.tensor(back["pred_kps"], dtype=torch.float64).reshape(-1, 2)
                tolerance = self.cycle_alpha * max(record["src_size"])
                consistent = cycle_consistent(src, pred, back_src, back_pred, tolerance)
            keep = counts.drop("cycle", keep, consistent)
        return src, trg, keep


class SPairPseudoLabels(PseudoLabels, SPairDataModule):
    """SPair-71k with pseudo-labelled training pairs (``data=spair_pseudo_labels``)."""


class CUBPseudoLabels(PseudoLabels, CUBDataModule):
    """CUB-200-2011 with pseudo-labelled training pairs (``data=cub_pseudo_labels``)."""
