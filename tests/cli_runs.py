"""Helpers for tests that run the real `sdzero` command in subprocesses."""

import json
import os
import subprocess
import sys
from pathlib import Path

TIMING = {"seconds_per_pair", "seconds_per_image"}
DDP2 = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]


def sdzero_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", **extra}
    env.pop("SDZERO_RUN_DIR", None)
    return env


def sdzero(*args: str, env: dict[str, str] | None = None, timeout: int = 600):
    """Run `python -m sdzero.cli ARGS`; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "sdzero.cli", *args],
        env=sdzero_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def sdzero_many(
    commands: list[tuple[str, list[str]]], folder: Path, env: dict[str, str] | None = None
) -> dict[str, str]:
    """Run several `sdzero` commands (``[name, argv]``) in one process, or one DDP world when
    they ask for it (``ddp_many.py``): the imports are paid once. Asserts all succeed; returns
    name -> that command's stdout."""
    spec = folder / "commands.json"
    spec.write_text(json.dumps(commands))
    res = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("ddp_many.py")), str(spec)],
        env=sdzero_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    sections = dict(part.split("\n", 1) for part in res.stdout.split("=== ")[1:])
    assert list(sections) == [name for name, _ in commands], res.stdout[-2000:]
    return sections


def eval_ok(experiment: str, out: Path, *overrides: str, env: dict[str, str] | None = None):
    """`sdzero eval EXPERIMENT output_dir=OUT ...`, asserting it succeeds."""
    res = sdzero("eval", experiment, f"output_dir={out}", *overrides, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def metrics(run_dir: Path) -> dict:
    """metrics.json without its timing keys (which differ between runs)."""
    m = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in m.items() if k not in TIMING}


def records_per_rank(run_dir: Path) -> dict[str, int]:
    from sdzero.records import read_records

    return {p.name: len(list(read_records(p))) for p in (run_dir / "predictions").glob("*.jsonl")}
