"""The run folder of ``eval`` and ``train``: where it is, that it may be used, and what it holds.

:class:`RunFolder` is entered before the work starts: it finds the folder (``resume``, else
``output_dir``, else ``runs/<experiment>/<timestamp>``) and checks it (a fresh run refuses a folder
with finished work; a resumed one must have the same settings) without creating anything; the
runner calls :meth:`RunFolder.create` only once the data are validated, so a run that fails early
leaves no empty folder. Creating takes a lock (two processes never write one folder), starts
``run.log`` and writes ``config.yaml``. On Ctrl-C the exact command that resumes the run is printed.
DDP ranks started by Lightning inherit the folder through ``SDZERO_RUN_DIR``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from sdzero.config import ConfigError, save_config
from sdzero.records import write_json_atomic

log = logging.getLogger(__name__)

FINISHED_WORK = ("predictions/*.jsonl", "checkpoints/*.ckpt")
"""What a fresh run refuses to find in its folder (it belongs to a run to resume)."""
RUN_DIR_ENV = "SDZERO_RUN_DIR"  # shared by DDP ranks re-launched by Lightning (they inherit it)
RESUMABLE_KEYS = ("seed", "method", "data", "backbone")
"""The settings a resumed run must share with the run that made the records."""


class RunFolder:
    """The folder of one run; use as ``with RunFolder(cfg) as folder: ... folder.create()``."""

    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg
        self.inherited = bool(os.environ.get(RUN_DIR_ENV))  # a rank launched by rank 0
        self.path = self._plan()
        self._lock: Any = None
        self._handler: logging.Handler | None = None

    def _plan(self) -> Path:
        cfg = self.cfg
        if self.inherited:  # rank 0 checked the folder
            return Path(os.environ[RUN_DIR_ENV])
        if cfg.resume:
            path = Path(cfg.resume)
            if not (path / "config.yaml").is_file():
                raise ConfigError(
                    f"resume={str(path)!r} is not a run folder (no config.yaml in it)"
                )
            check_same_run(cfg, path)
        elif cfg.output_dir:
            path = Path(cfg.output_dir)
        elif launched_processes() > 1:
            raise ConfigError(
                "this process is one of several started by torchrun/srun: set output_dir=... (or "
                "resume=...) so that all of them share one run folder"
            )
        else:
            path = Path("runs") / str(cfg.experiment or "eval") / time.strftime("%Y%m%d-%H%M%S")
        path = path.resolve()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"output_dir={str(path)!r} is a file; expected a folder path")
        if not cfg.resume and any(p for pattern in FINISHED_WORK for p in path.glob(pattern)):
            raise ConfigError(
                f"output_dir={str(path)!r} already holds prediction records or checkpoints; "
                f"continue that run with resume={path} or choose another output_dir"
            )
        return path

    def create(self) -> Path:
        """Create the folder, lock it, start ``run.log``, write ``config.yaml``; its path."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:  # no permission, read-only disk
            raise ConfigError(
                f"output_dir={str(self.path)!r}: cannot write the run folder ({err}); expected a "
                "writable folder path"
            ) from err
        if not self.inherited and rank_zero_only.rank == 0:
            self._take_lock()
        rank = rank_zero_only.rank
        name = "run.log" if rank == 0 else f"run.rank{rank}.log"
        self._handler = logging.FileHandler(self.path / name)
        self._handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        logging.getLogger().addHandler(self._handler)
        if rank == 0:
            save_config(self.cfg, self.path / "config.yaml")
        os.environ[RUN_DIR_ENV] = str(self.path)
        return self.path

    def _take_lock(self) -> None:
        self._lock = open(self.path / ".lock", "w")  # noqa: SIM115 - held for the whole run
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            self._lock.close()
            self._lock = None
            raise ConfigError(
                f"{str(self.path)!r} is in use by another sdzero process (its lock file .lock is "
                "held); wait for it to end, or choose another output_dir"
            ) from err

    def __enter__(self) -> RunFolder:
        return self

    def __exit__(self, kind: type | None, err: BaseException | None, tb: Any) -> None:
        interrupted = kind is not None and issubclass(kind, KeyboardInterrupt | SystemExit)
        if interrupted and self.path.is_dir() and rank_zero_only.rank == 0:
            print(
                f"\nsdzero: interrupted; continue with:\n  {resume_command(self.path)}",
                file=sys.stderr,
            )
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        if self._lock is not None:
            self._lock.close()
        if not self.inherited:  # the next run in this process gets its own folder
            os.environ.pop(RUN_DIR_ENV, None)


def resume_command(run_dir: Path, argv: list[str] | None = None) -> str:
    """The command line that resumes ``run_dir``: this one with ``resume=`` for ``output_dir=``."""
    args = list(sys.argv[1:] if argv is None else argv)
    kept = [a for a in args if not a.startswith(("output_dir=", "resume="))]
    return " ".join(["sdzero", *kept, f"resume={run_dir}"])


def launched_processes() -> int:
    """How many processes an external launcher (torchrun, SLURM) started for this run."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _leaves(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def check_same_run(cfg: DictConfig, run_dir: Path) -> None:
    """A resumed run must use the settings that produced the records (seed, method, data,
    backbone; ``data.limit`` may differ). The error names each differing key."""
    try:
        saved = OmegaConf.load(run_dir / "config.yaml")
        if not isinstance(saved, DictConfig):
            raise ValueError("not a mapping")
    except Exception as err:  # a truncated or hand-edited file
        raise ConfigError(
            f"resume={str(run_dir)!r}: its config.yaml cannot be read ({str(err).splitlines()[0]}); "
            "expected the YAML mapping sdzero wrote"
        ) from err
    differ = []
    for key in RESUMABLE_KEYS:
        old = _leaves(OmegaConf.to_container(saved, resolve=True).get(key), key)
        new = _leaves(OmegaConf.to_container(cfg, resolve=True).get(key), key)
        for name in sorted(set(old) | set(new)):
            if name != "data.limit" and old.get(name) != new.get(name):
                differ.append(f"{name}: {old.get(name)!r} vs {new.get(name)!r}")
    if differ:
        raise ConfigError(
            f"resume={str(run_dir)!r}: its config.yaml has other settings ({'; '.join(differ)}); "
            "resume with the same experiment and overrides"
        )


def retire_stale_evaluation(run_dir: Path, checkpoint: Path) -> None:
    """Before the evaluation of ``checkpoint``: records and ``metrics.json`` of an earlier
    evaluation of *other* weights (training continued and found a better checkpoint) move to
    ``stale/<sha256 prefix>/`` so the new evaluation does not reuse them; records of the same
    weights stay and are reused. ``evaluated.json`` names the weights the records belong to."""
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
