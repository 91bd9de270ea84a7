"""Run several ``sdzero`` commands in one multi-process DDP world: ``python ddp_many.py SPEC``.

SPEC is a JSON list of ``[name, argv]``; each ``argv`` is given to :func:`sdzero.cli.main` in turn.
Lightning starts the other ranks once, at the first command's Trainer, by running this same
script, so every rank runs the same commands in order and the imports are paid once per rank
instead of once per command (the contract tests' DDP runs of every method share one launch).
Each argv names its run folder (``output_dir=``): the other ranks follow rank 0 into it, as in
``sdzero suite`` (a rank started by Lightning otherwise keeps the first command's folder). Rank 0
prints ``=== name`` before each command's output; the exit status is 1 if any command failed.
"""

import json
import os
import sys
from pathlib import Path

from sdzero.cli import main
from sdzero.run_folder import RUN_DIR_ENV


def run(spec: Path) -> int:
    failed = False
    for name, argv in json.loads(spec.read_text()):
        if os.environ.get("LOCAL_RANK", "0") == "0":  # Lightning sets it to 0 on the launcher
            print(f"=== {name}", flush=True)
        else:
            (out,) = (a.split("=", 1)[1] for a in argv if a.startswith("output_dir="))
            os.environ[RUN_DIR_ENV] = out
        failed |= main(argv) != 0
        sys.stdout.flush()
    return int(failed)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
