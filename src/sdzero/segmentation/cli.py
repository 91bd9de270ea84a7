"""``sdzero segment`` and ``sdzero prototypes build`` (registered by ``sdzero.cli``)."""

from __future__ import annotations

import argparse
import json

from sdzero.errors import InputError

OVERRIDES_HELP = (
    "key=value config overrides (method.*, backbone=<name>, trainer.accelerator, ...), placed "
    "right after the positional arguments or after the class names"
)


def _pixel(text: str) -> tuple[int, int]:
    try:
        x, y = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected X,Y in pixels, got {text!r}") from None
    return x, y


def _split_overrides(args: argparse.Namespace) -> None:
    """``--classes a b key=value``: the greedy ``--classes`` also swallows trailing overrides."""
    args.overrides = [*args.overrides, *(c for c in args.classes if "=" in c)]
    args.classes = [c for c in args.classes if "=" not in c]


def _segment(args: argparse.Namespace) -> int:
    from sdzero.segmentation.api import segment_file

    _split_overrides(args)
    if args.pixel is not None and not args.explain:
        raise InputError(
            "--pixel X,Y names the pixel --explain OUT.png explains; give --explain too"
        )
    from sdzero.records import check_output_path

    for option in ("out", "explain", "overlay"):
        if getattr(args, option):
            check_output_path(getattr(args, option), f"--{option}")
    summary = segment_file(
        args.image, args.classes, args.overrides, args.out, args.explain, args.pixel, args.overlay
    )
    print(json.dumps(summary, indent=2))
    return 0


def _build(args: argparse.Namespace) -> int:
    from sdzero.segmentation.api import build_prototype_cache

    _split_overrides(args)
    from sdzero.records import check_output_path

    check_output_path(args.out, "--out", folder=True)
    print(json.dumps(build_prototype_cache(args.classes, args.out, args.overrides), indent=2))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``segment`` and ``prototypes build`` to the ``sdzero`` command."""
    p = subparsers.add_parser(
        "segment", help="segment an image into the given classes (OVDiff), print a JSON summary"
    )
    p.add_argument("image", help="image file")
    p.add_argument("--classes", nargs="*", default=[], metavar="NAME", help="class names")
    p.add_argument(
        "--out", help="write the mask here (PNG of class indices, 0 = background; see --overlay)"
    )
    p.add_argument(
        "--overlay", metavar="OUT.png", help="write the mask coloured over the image, with a legend"
    )
    p.add_argument("--explain", metavar="OUT.png", help="write why --pixel got its label")
    p.add_argument("--pixel", type=_pixel, metavar="X,Y", help="pixel to explain (image pixels)")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_segment)

    p = subparsers.add_parser("prototypes", help="prototype cache commands")
    sub = p.add_subparsers(dest="prototypes_command", required=True)
    b = sub.add_parser("build", help="build and cache the prototypes of classes")
    b.add_argument("--classes", nargs="*", default=[], metavar="NAME", help="class names")
    b.add_argument("--out", required=True, help="the cache folder (method.prototype_cache)")
    b.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    b.set_defaults(func=_build)
