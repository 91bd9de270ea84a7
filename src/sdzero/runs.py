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
from omegaconf import DictConfig

from sdzero.config import ConfigError, instantiate, save_config

log = logging.getLogger(__name__)

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
        and any(run_dir.glob("predictions/*.jsonl"))
    ):
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds prediction records; continue that run with "
            f"resume={run_dir} or choose another output_dir"
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

        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
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
    ``extra`` sets further constructor arguments (``run_dir``, or ``method.*`` keys)."""
    return instantiate(
        cfg.method, key="method", backbone=_plain(cfg.backbone), seed=int(cfg.seed), **extra
    )


def build_trainer(cfg: DictConfig, logger: Any) -> pl.Trainer:
    """A Trainer for evaluation: ``inference_mode=False`` so methods may optimise in ``test_step``."""
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    kwargs = _plain(cfg.trainer)
    try:
        return pl.Trainer(
            **kwargs,
            logger=logger,
            inference_mode=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            use_distributed_sampler=False,  # the datamodules shard without repeating samples
            default_root_dir=os.environ[RUN_DIR_ENV],
        )
    except (MisconfigurationException, TypeError, ValueError) as err:
        # the constructor only checks its arguments, and all but the fixed ones are trainer.* keys
        raise ConfigError(f"trainer: {err}") from err


def run_eval(cfg: DictConfig) -> dict[str, Any]:
    """Run one evaluation; returns the ``metrics.json`` object (also written into the run folder)."""
    launched_by_parent = bool(os.environ.get(RUN_DIR_ENV))
    try:
        pl.seed_everything(int(cfg.seed), workers=True, verbose=False)
        run_dir = make_run_dir(cfg)
        save_config(cfg, run_dir / "config.yaml")
        datamodule = instantiate(cfg.data, key="data")
        datamodule.setup("test")  # reads and validates the annotation files before any model
        module = build_method(cfg, run_dir=str(run_dir), visuals=cfg.visuals)
        logger = build_logger(cfg, run_dir)
        trainer = build_trainer(cfg, logger)
        trainer.test(module, datamodule=datamodule, verbose=False)
        if logger and cfg.logger.kind == "wandb" and trainer.global_rank == 0:
            if cfg.logger.artifacts and hasattr(module, "cache_root"):
                log_folder_artifact(logger, module.cache_root(), "prototypes")
            logger.experiment.finish()
        if module.final_metrics is not None:
            return module.final_metrics
        return json.loads((run_dir / "metrics.json").read_text())
    finally:
        if not launched_by_parent:  # the next run in this process gets its own folder
            os.environ.pop(RUN_DIR_ENV, None)


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
