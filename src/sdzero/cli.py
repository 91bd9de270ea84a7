"""The ``sdzero`` command: eval, train, demo, config, match, segment, prototypes build, info."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from sdzero.config import GROUPS, available, compose, config_dir
from sdzero.errors import UserError

# The demo's parts: (experiment, run folder under --out, what it shows and what its numbers mean).
DEMO_PARTS = (
    (
        "demo_correspondence",
        "correspondence",
        "Hedlin et al.'s prompt optimisation on the tiny random-weight Stable Diffusion: the real "
        "fitting loop; its PCK comes from RANDOM WEIGHTS and is meaningless.",
    ),
    (
        "demo_segmentation",
        "segmentation",
        "OVDiff's prototypes and sliding windows on plain COLOUR FEATURES with the bundled "
        "support folder: no Stable Diffusion runs in this part; its mIoU is the colour "
        "features' on coloured shapes (a known answer), not the method's.",
    ),
    (
        "demo_segmentation_sd",
        "segmentation_sd",
        "OVDiff's own pipeline on the tiny random-weight Stable Diffusion: support images "
        "sampled with SD, masks from their cross-attention, SD features, prototypes, windows "
        "(128 px, 3 images per class); its mIoU comes from RANDOM WEIGHTS and is meaningless.",
    ),
)
METHOD_CLIS = (
    "sdzero.correspondence.cli",
    "sdzero.segmentation.cli",
    "sdzero.report",
    "sdzero.cache_cli",
    "sdzero.suite",
)


def _eval(args: argparse.Namespace) -> int:
    cfg = compose(args.experiment, args.overrides)  # config errors come before torch loads
    from sdzero.runs import run_eval

    return _print_metrics(run_eval(cfg))


def _train(args: argparse.Namespace) -> int:
    cfg = compose(args.experiment, args.overrides)
    from sdzero.runs import run_train

    return _print_metrics(run_train(cfg))


def _print_metrics(metrics: dict[str, Any]) -> int:
    """Print a run's metrics table on rank 0."""
    from lightning_fabric.utilities.rank_zero import rank_zero_only

    from sdzero.runs import format_metrics

    if rank_zero_only.rank == 0:
        print(format_metrics(metrics))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """Run the :data:`DEMO_PARTS` in turn, each into its folder under ``--out``; every part's
    config is composed (and checked) before the first one runs."""
    out = Path(args.out)
    parts = [(name, out / folder, text) for name, folder, text in DEMO_PARTS]
    configs = [compose(name, [f"output_dir={d}", *args.overrides]) for name, d, _ in parts]
    from sdzero.run_folder import RUN_DIR_ENV
    from sdzero.runs import format_metrics, run_eval

    for (name, run_dir, text), cfg in zip(parts, configs, strict=True):
        print(f"\n== {name} -> {run_dir}\n{text}", flush=True)
        os.environ.pop(RUN_DIR_ENV, None)
        start = time.monotonic()
        metrics = run_eval(cfg)
        print(f"{format_metrics(metrics)}\n({name}: {time.monotonic() - start:.0f} s)")
    return 0


def _config(args: argparse.Namespace) -> int:
    """Print the composed, validated config (every key with the value a run would use)."""
    cfg = compose(args.experiment, args.overrides)
    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    return 0


def _info(args: argparse.Namespace) -> int:
    import importlib.metadata as md

    from sdzero.backbones.sources import describe_source

    print("versions:")
    for pkg in (
        "sdzero",
        "torch",
        "torchvision",
        "diffusers",
        "transformers",
        "pytorch-lightning",
        "torchmetrics",
        "open-clip-torch",
        "timm",
        "wandb",
        "omegaconf",
    ):
        try:
            print(f"  {pkg:18s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            print(f"  {pkg:18s} not installed")
    print(f"configs: {config_dir()}")
    print("backbones (backbone=<name>):")
    for name in available("backbone"):
        node = OmegaConf.load(config_dir() / "backbone" / f"{name}.yaml")
        print(f"  {name:18s} {describe_source(node.weights, node.arch)}")
    print("datasets (data=<name>, data.root=...):")
    for name in available("data"):
        node = OmegaConf.load(config_dir() / "data" / f"{name}.yaml")
        if OmegaConf.is_missing(node, "root"):
            where = "needs data.root=<the unpacked dataset>"
        else:
            where = "generated on the fly (data.root=null: a temporary folder)"
        print(f"  {name:24s} {where}; {node._target_}")
    print("experiments (sdzero eval <name>):")
    for name in available("experiment"):
        print(f"  {name}")
    # last, and flushed first: torch's import (seconds) is all that is left to wait for
    print("devices:", flush=True)
    import torch

    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"  cpu threads        {torch.get_num_threads()}")
    print(f"  cuda devices       {cuda}")
    for i in range(cuda):
        print(f"    cuda:{i}          {torch.cuda.get_device_name(i)}")
    return 0


def _version() -> str:
    import importlib.metadata as md

    try:
        return md.version("sdzero")
    except md.PackageNotFoundError:
        return "unknown (not installed)"


def _choices_epilog() -> str:
    """The experiments and group options, listed under ``eval/train/config --help``."""
    try:
        lines = ["experiments: " + ", ".join(available("experiment"))]
        lines += [f"{group}=: " + ", ".join(available(group)) for group in GROUPS]
    except UserError:  # no configs/ folder: the command itself will say so
        return ""
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdzero", description="Zero-shot vision with frozen Stable Diffusion."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"sdzero {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    choices = _choices_epilog()

    experiment_commands = (
        ("eval", "evaluate an experiment on its benchmark", _eval),
        ("train", "fit a trainable method, then evaluate its best checkpoint", _train),
        ("config", "print the composed, validated config and stop", _config),
    )
    for name, text, func in experiment_commands:
        p = sub.add_parser(
            name,
            help=text,
            epilog=choices,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("experiment", help="a name under configs/experiment/ or a YAML path")
        p.add_argument(
            "overrides", nargs="*", help="key=value config overrides, group=option choices"
        )
        p.set_defaults(func=func)

    p = sub.add_parser("demo", help="run the demo experiments on synthetic data (CPU, no download)")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument(
        "overrides", nargs="*", help="key=value overrides applied to every part of the demo"
    )
    p.set_defaults(func=_demo)

    p = sub.add_parser("info", help="versions, devices, backbones, datasets")
    p.set_defaults(func=_info)

    for (
        package
    ) in METHOD_CLIS:  # each method registers its own commands (match, segment, prototypes)
        try:
            module = importlib.import_module(package)
        except ModuleNotFoundError as err:
            if err.name != package:
                raise
            continue
        module.register_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``sdzero`` command; a :class:`UserError` prints ``sdzero: error: <message>`` on
    stderr and returns 2 (``-v`` logs its traceback too), any other exception propagates."""
    parser = build_parser()
    # key=value overrides may follow options (`--viz out.png backbone=tiny`): argparse leaves
    # those unparsed once the positional `overrides` has been filled, so collect them here
    args, extra = parser.parse_known_args(argv)
    stray = [
        a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except UserError as err:  # anything else is a bug: its traceback stays
        logging.getLogger("sdzero").debug("user error", exc_info=True)
        print(f"sdzero: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
