"""`sdzero eval`: build the datamodule, the method and a Lightning Trainer from a composed config, run.

Order matters for failing early: the config is validated (compose), then the dataset files are read
and checked (datamodule setup), and only then is the backbone loaded.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sdzero.callbacks import TaskMetrics, evaluation_callbacks
from sdzero.config import ConfigError, _check_types, _import, instantiate
from sdzero.requirements import check_requirements
from sdzero.run_folder import RunFolder, retire_stale_evaluation

log = logging.getLogger(__name__)


def wandb_has_key() -> bool:
    """Whether a W&B API key is configured (env var or netrc), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def build_logger(cfg: DictConfig, run_dir: Path) -> Any:
    """The run's Lightning logger from the ``logger`` group (``wandb`` | ``csv`` | ``none``)."""
    kind = cfg.logger.kind
    if kind == "none":
        return False
    if kind == "csv":
        from pytorch_lightning.loggers import CSVLogger

        # a resumed run logs beside the earlier part (CSVLogger would overwrite its file)
        version, k = "", 1
        while (run_dir / "csv" / version / "metrics.csv").is_file():
            version, k = f"resumed-{k}", k + 1
        return CSVLogger(save_dir=str(run_dir), name="csv", version=version)
    if kind == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        offline = cfg.logger.offline if cfg.logger.offline is not None else not wandb_has_key()
        name = cfg.logger.name or f"{cfg.experiment or 'eval'}-{run_dir.name}"
        return WandbLogger(
            project=cfg.logger.project,
            entity=cfg.logger.entity,
            name=name,
            save_dir=str(run_dir),
            offline=bool(offline),
            tags=list(cfg.logger.tags),
            config=_plain(cfg),
        )
    raise ConfigError(f"logger.kind must be wandb, csv or none, got {kind!r}")


def _plain(cfg: DictConfig) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def log_folder_artifact(logger: Any, folder: Path, kind: str) -> None:
    """Upload ``folder`` (e.g. a prototype cache) as a W&B artifact of type ``kind``."""
    import wandb

    if not Path(folder).is_dir():
        log.warning("no %s folder at %s to log as an artifact", kind, folder)
        return
    artifact = wandb.Artifact(name=f"{kind}-{logger.experiment.id}", type=kind)
    artifact.add_dir(str(folder))
    logger.experiment.log_artifact(artifact)


def build_method(cfg: DictConfig, **extra: Any) -> pl.LightningModule:
    """The method module of a composed config, given its backbone group and the run seed;
    ``extra`` sets further ``method.*`` keys."""
    return instantiate(
        cfg.method, key="method", backbone=_plain(cfg.backbone), seed=int(cfg.seed), **extra
    )


def build_trainer(
    cfg: DictConfig, run_dir: Path, logger: Any, callbacks: list[pl.Callback], **fixed: Any
) -> pl.Trainer:
    """A Trainer from the ``trainer`` group, working in the run folder. For evaluation (the
    default ``fixed``) ``inference_mode=False`` lets methods optimise in ``test_step``, and the
    datamodules shard the test split themselves (no sample repeated to even out the ranks)."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    fixed = {
        "inference_mode": False,
        "enable_checkpointing": False,
        "use_distributed_sampler": False,
        "enable_model_summary": False,
        **fixed,
    }
    _check_types(pl.Trainer, _plain(cfg.trainer), "trainer")  # e.g. trainer.max_epochs=abc
    try:
        return pl.Trainer(
            **_plain(cfg.trainer),
            **fixed,
            logger=logger,
            callbacks=callbacks,
            default_root_dir=str(run_dir),
        )
    except (MisconfigurationException, TypeError, ValueError, AssertionError) as err:
        # the constructor only checks its arguments, and all but the fixed ones are trainer.* keys
        raise ConfigError(f"trainer: {err}") from err
    except ImportError as err:  # an accelerator or strategy whose package is not installed
        raise ConfigError(f"trainer: {err}") from err


def check_trainer(cfg: DictConfig, **fixed: Any) -> None:
    """Build (and drop) the run's Trainer once before the run folder exists, so that a bad
    ``trainer.*`` value is an error that leaves nothing behind (Lightning's device report is
    silenced for it: the real Trainer prints it)."""
    import tempfile

    quiet = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            build_trainer(cfg, Path(scratch), False, [], **fixed)
    finally:
        quiet.setLevel(level)


def evaluate(
    cfg: DictConfig, module: pl.LightningModule, datamodule: Any, run_dir: Path, logger: Any
) -> dict[str, Any]:
    """``trainer.test`` of ``module`` with the run folder's callbacks; the ``metrics.json`` object."""
    callbacks = evaluation_callbacks(run_dir, cfg.visuals, cfg.get("protocol"))
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    trainer.test(module, datamodule=datamodule, verbose=False)
    scorer = next(c for c in callbacks if isinstance(c, TaskMetrics))
    wandb_rank0 = logger and cfg.logger.kind == "wandb" and trainer.global_rank == 0
    if wandb_rank0 and cfg.logger.artifacts and hasattr(module, "cache_root"):
        log_folder_artifact(logger, module.cache_root(), "prototypes")
    return scorer.metrics


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Run one evaluation; returns the ``metrics.json`` object (also written into the run folder)."""
    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    with RunFolder(cfg) as folder:
        datamodule = instantiate(cfg.data, key="data")
        datamodule.setup("test")  # reads and validates the annotation files before any model
        module = build_method(cfg)
        check_requirements(module.requirements())
        check_trainer(cfg)
        run_dir = folder.create()
        logger = build_logger(cfg, run_dir)
        metrics = evaluate(cfg, module, datamodule, run_dir, logger)
        if logger and cfg.logger.kind == "wandb" and rank_zero_only.rank == 0:
            logger.experiment.finish()
        return metrics


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """``fit`` the method on the datamodule's training split (validating on its val split),
    checkpointing into ``checkpoints/`` (``last.ckpt`` and the best by the method's ``monitor``),
    then evaluate the best checkpoint on the test split exactly as :func:`run_eval` does, into the
    same run folder. ``resume=RUN_DIR`` continues from ``last.ckpt`` (and then the evaluation from
    its records). Returns the ``metrics.json`` object."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.model_helpers import is_overridden

    pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
    with RunFolder(cfg) as run:
        method_class = _import(str(cfg.method._target_))
        if not is_overridden("training_step", method_class, pl.LightningModule):
            raise ConfigError(
                f"method: {method_class.__name__} cannot be trained (it defines no "
                "training_step); evaluate it with sdzero eval"
            )
        datamodule = instantiate(cfg.data, key="data")
        if not hasattr(datamodule, "train_split"):
            raise ConfigError(f"data: {type(datamodule).__name__} has no training split")
        datamodule.setup("fit")  # reads every split's files before any model
        module = build_method(cfg)
        check_requirements(module.requirements())
        check_trainer(cfg, enable_checkpointing=True)
        run_dir = run.create()
        monitor, mode = getattr(module, "monitor", ("val/loss", "min"))
        if datamodule.val_split is None:
            monitor, mode = monitor.replace("val/", "train/"), mode
        checkpoints = run_dir / "checkpoints"
        checkpoint = ModelCheckpoint(
            dirpath=checkpoints, filename="best", monitor=monitor, mode=mode, save_top_k=1
        )
        # every epoch's state for resume= (Lightning's save_last follows the best checkpoint only)
        latest = ModelCheckpoint(dirpath=checkpoints, filename="last", save_top_k=1)
        logger = build_logger(cfg, run_dir)
        fixed = {"enable_checkpointing": True, "use_distributed_sampler": True}
        trainer = build_trainer(cfg, run_dir, logger, [checkpoint, latest], **fixed)
        last = checkpoints / "last.ckpt"
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(last) if last.is_file() else None)
        best = trainer.strategy.broadcast(checkpoint.best_model_path or str(last))
        if trainer.global_rank == 0:
            retire_stale_evaluation(run_dir, Path(best))
        trainer.strategy.barrier()
        log.info("evaluating the best checkpoint %s", best)
        module = build_method(cfg, checkpoint=str(best))
        metrics = evaluate(cfg, module, datamodule, run_dir, logger)
        if logger and cfg.logger.kind == "wandb" and rank_zero_only.rank == 0:
            logger.experiment.finish()
        return metrics


def recompute_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` object of a run folder recomputed from its records alone (its
    ``config.yaml``, the dataset's annotations, the records and their artifacts; no model is
    loaded), without the timing key."""
    from omegaconf import OmegaConf

    from sdzero.callbacks import finished_records, predictions_dir, summarise

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = instantiate(cfg.data, key="data")
    datamodule.setup("test")
    task = build_method(cfg).make_task(datamodule)
    if cfg.get("protocol") is not None:
        task.protocol = cfg.protocol
    folder = predictions_dir(run_dir)
    records, skipped = finished_records(folder, task)
    for index in sorted(records):
        task.update(records[index], datamodule.dataset[index], None, folder)
    summary = summarise(task, task.metric.compute(), None, datamodule, len(skipped))
    return {k: v for k, v in summary.items() if v is not None}


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small plain-text table of the headline numbers of a ``metrics.json`` object."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if isinstance(value, dict) and any(isinstance(v, dict) for v in value.values()):
            continue  # per-category / per-level tables: in metrics.json
        if isinstance(value, dict):
            rows += [(f"{key}@{k}", _fmt(v)) for k, v in value.items()]
        else:
            rows.append((key, _fmt(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
