"""`sdzero eval`: build the datamodule, the method and a Lightning Trainer from a composed config, run.

Order matters for failing early: the config is validated (compose), then the dataset files are read
and checked (datamodule setup), and only then is the backbone loaded.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from sdzero.callbacks import TaskMetrics, evaluation_callbacks
from sdzero.config import ConfigError, _import, instantiate, save_config

log = logging.getLogger(__name__)

FINISHED_WORK = ("predictions/*.jsonl", "checkpoints/*.ckpt")
"""What a fresh run refuses to find in its folder (it belongs to a run to resume)."""
RUN_DIR_ENV = (
    "SDZERO_RUN_DIR"  # shared by DDP ranks re-launched by Lightning (they inherit the env)
)


def make_run_dir(cfg: DictConfig) -> Path:
    """Create the run folder, the same on all ranks: ``resume``, else ``output_dir``, else
    ``runs/<experiment>/<timestamp>``. A fresh run refuses a folder that already holds records."""
    if os.environ.get(RUN_DIR_ENV):  # a DDP rank launched by rank 0: rank 0 checked the folder
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif cfg.resume:
        run_dir = Path(cfg.resume)
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"resume={str(run_dir)!r} is not a run folder (no config.yaml in it)")
        _check_same_run(cfg, run_dir)
    elif cfg.output_dir:
        run_dir = Path(cfg.output_dir)
    elif _launched_processes() > 1:
        raise ConfigError(
            "this process is one of several started by torchrun/srun: set output_dir=... (or "
            "resume=...) so that all of them share one run folder"
        )
    else:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / str(cfg.experiment or "eval") / stamp
    run_dir = run_dir.resolve()
    if (
        not cfg.resume
        and not os.environ.get(RUN_DIR_ENV)
        and any(p for pattern in FINISHED_WORK for p in run_dir.glob(pattern))
    ):
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds prediction records or checkpoints; "
            f"continue that run with resume={run_dir} or choose another output_dir"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file of that name, no permission, read-only disk
        raise ConfigError(
            f"output_dir={str(run_dir)!r}: cannot create the run folder ({err}); expected a "
            "writable folder path"
        ) from err
    os.environ[RUN_DIR_ENV] = str(run_dir)
    return run_dir


def _launched_processes() -> int:
    """How many processes an external launcher (torchrun, SLURM) started for this run."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """A resumed run must use the settings that produced the records (seed, method, data, backbone)."""
    from omegaconf import OmegaConf

    saved = OmegaConf.load(run_dir / "config.yaml")
    for key in ("seed", "method", "data", "backbone"):
        old, new = OmegaConf.select(saved, key), OmegaConf.select(cfg, key)
        old = OmegaConf.to_container(old) if hasattr(old, "keys") else old
        new = OmegaConf.to_container(new) if hasattr(new, "keys") else new
        if key == "data":  # the split may be limited differently when resuming
            old, new = ({k: v for k, v in d.items() if k != "limit"} for d in (old, new))
        if old != new:
            raise ConfigError(
                f"resume={str(run_dir)!r}: its config.yaml has a different {key!r} "
                f"({old!r} vs {new!r}); resume with the same experiment and overrides"
            )


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
    cfg: DictConfig, logger: Any, callbacks: list[pl.Callback], **fixed: Any
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
    try:
        return pl.Trainer(
            **_plain(cfg.trainer),
            **fixed,
            logger=logger,
            callbacks=callbacks,
            default_root_dir=os.environ[RUN_DIR_ENV],
        )
    except (MisconfigurationException, TypeError, ValueError) as err:
        # the constructor only checks its arguments, and all but the fixed ones are trainer.* keys
        raise ConfigError(f"trainer: {err}") from err


def evaluate(
    cfg: DictConfig, module: pl.LightningModule, datamodule: Any, run_dir: Path, logger: Any
) -> dict[str, Any]:
    """``trainer.test`` of ``module`` with the run folder's callbacks; the ``metrics.json`` object."""
    callbacks = evaluation_callbacks(run_dir, cfg.visuals)
    trainer = build_trainer(cfg, logger, callbacks)
    trainer.test(module, datamodule=datamodule, verbose=False)
    scorer = next(c for c in callbacks if isinstance(c, TaskMetrics))
    wandb_rank0 = logger and cfg.logger.kind == "wandb" and trainer.global_rank == 0
    if wandb_rank0 and cfg.logger.artifacts and hasattr(module, "cache_root"):
        log_folder_artifact(logger, module.cache_root(), "prototypes")
    return scorer.metrics


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Run one evaluation; returns the ``metrics.json`` object (also written into the run folder)."""
    launched_by_parent = bool(os.environ.get(RUN_DIR_ENV))
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        run_dir = make_run_dir(cfg)
        save_config(cfg, run_dir / "config.yaml")
        datamodule = instantiate(cfg.data, key="data")
        datamodule.setup("test")  # reads and validates the annotation files before any model
        module = build_method(cfg)
        logger = build_logger(cfg, run_dir)
        metrics = evaluate(cfg, module, datamodule, run_dir, logger)
        if logger and cfg.logger.kind == "wandb" and rank_zero_only.rank == 0:
            logger.experiment.finish()
        return metrics
    finally:
        if not launched_by_parent:  # the next run in this process gets its own folder
            os.environ.pop(RUN_DIR_ENV, None)


def run_train(cfg: DictConfig) -> dict[str, Any]:
    """``fit`` the method on the datamodule's training split (validating on its val split),
    checkpointing into ``checkpoints/`` (``last.ckpt`` and the best by the method's ``monitor``),
    then evaluate the best checkpoint on the test split exactly as :func:`run_eval` does, into the
    same run folder. ``resume=RUN_DIR`` continues from ``last.ckpt`` (and then the evaluation from
    its records). Returns the ``metrics.json`` object."""
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.utilities.model_helpers import is_overridden

    launched_by_parent = bool(os.environ.get(RUN_DIR_ENV))
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        run_dir = make_run_dir(cfg)
        save_config(cfg, run_dir / "config.yaml")
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
        monitor, mode = getattr(module, "monitor", ("val/loss", "min"))
        if datamodule.val_split is None:
            monitor, mode = monitor.replace("val/", "train/"), mode
        folder = run_dir / "checkpoints"
        checkpoint = ModelCheckpoint(
            dirpath=folder,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_last=True,
            save_top_k=1,
        )
        logger = build_logger(cfg, run_dir)
        fixed = {"enable_checkpointing": True, "use_distributed_sampler": True}
        trainer = build_trainer(cfg, logger, [checkpoint], **fixed)
        last = folder / "last.ckpt"
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
    finally:
        if not launched_by_parent:
            os.environ.pop(RUN_DIR_ENV, None)


def retire_stale_evaluation(run_dir: Path, checkpoint: Path) -> None:
    """Before the evaluation of ``checkpoint``: records and ``metrics.json`` of an earlier
    evaluation of *other* weights (training continued and found a better checkpoint) move to
    ``stale/<sha256 prefix>/`` so the new evaluation does not reuse them; records of the same
    weights stay and are reused. ``evaluated.json`` names the weights the records belong to."""
    import hashlib
    import shutil

    from sdzero.records import write_json_atomic

    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    stamp = run_dir / "evaluated.json"
    if stamp.is_file():
        old = json.loads(stamp.read_text()).get("sha256", "")
        if old != digest:
            stale = run_dir / "stale" / old[:12]
            stale.mkdir(parents=True, exist_ok=True)
            for name in ("predictions", "metrics.json", "visuals"):
                if (run_dir / name).exists():
                    shutil.move(str(run_dir / name), str(stale / name))
            log.warning("training went on: the evaluation of older weights moved to %s", stale)
    write_json_atomic(stamp, {"checkpoint": str(checkpoint.relative_to(run_dir)), "sha256": digest})


def recompute_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The ``metrics.json`` object of a run folder recomputed from its records alone (its
    ``config.yaml``, the dataset's annotations, the records and their artifacts; no model is
    loaded), without the timing key."""
    from omegaconf import OmegaConf

    from sdzero.callbacks import predictions_dir, summarise
    from sdzero.records import read_records

    run_dir = Path(run_dir)
    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = instantiate(cfg.data, key="data")
    datamodule.setup("test")
    task = build_method(cfg).make_task(datamodule)
    folder = predictions_dir(run_dir)
    records: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("*.jsonl")):
        for record in read_records(path):
            records.setdefault(record["index"], record)
    for index in sorted(records):
        task.update(records[index], datamodule.dataset[index], None, folder)
    summary = summarise(task, task.metric.compute(), None, datamodule)
    return {k: v for k, v in summary.items() if v is not None}


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small plain-text table of the headline numbers of a ``metrics.json`` object."""
    rows: list[tuple[str, str]] = []
    for key, value in metrics.items():
        if key in {"per_category", "per_class_iou"}:
            continue
        if isinstance(value, dict):
            rows += [(f"{key}@{k}", _fmt(v)) for k, v in value.items()]
        else:
            rows.append((key, _fmt(value)))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
