"""``sdzero match SRC TRG --points X,Y ... [--viz OUT.png] [key=value ...]``."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from sdzero.errors import InputError

if TYPE_CHECKING:  # torch loads when a match runs, not when the command line is parsed
    import torch


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--points {text!r}: expected X,Y (pixels of SRC), e.g. 10,20") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise InputError(f"--points {text!r}: expected finite numbers X,Y (pixels of SRC)")
    return x, y


class Match(NamedTuple):
    """``sdzero match``'s result: the ``(3, H, W)`` uint8 images, the predictions ``(N, 2)`` in
    target pixels, and whether the method ran on random weights."""

    src_img: torch.Tensor
    trg_img: torch.Tensor
    pred: torch.Tensor
    random_weights: bool


def match_images(
    src: str | Path, trg: str | Path, points: list[tuple[float, float]], overrides: list[str]
) -> Match:
    """Match ``points`` ((x, y) pixels of the source file) into the target file.

    ``overrides`` are config items (``backbone=...``, ``method.steps=...``) on top of the default
    backbone and method of ``configs/eval.yaml``.
    """
    if not points:
        raise InputError("--points: give at least one query point, X,Y [X,Y ...]")
    from PIL import Image

    from sdzero.correspondence.query_points import check_query_points

    # the points against the source's size first, from its header (composing the config imports
    # the method's modules: diffusers, Lightning); an unreadable file is reported by load_rgb
    with contextlib.suppress(OSError), Image.open(src) as header:
        check_query_points(points, *header.size, f"source image {str(src)!r}")
    from sdzero.config import compose

    cfg = compose(None, ["data=synthetic_correspondence", *overrides])
    import torch

    from datamodules.files import load_rgb
    from sdzero.correspondence.base import PairInfo
    from sdzero.requirements import check_requirements
    from sdzero.runs import build_method

    src_img, trg_img = load_rgb(src), load_rgb(trg)  # the grid of the header checked above
    query = torch.tensor(points, dtype=torch.float32)
    module = build_method(cfg)
    check_requirements(module.requirements())  # every input is checked before the model loads
    module.setup("test")
    pred = module.predict_pair(
        src_img, trg_img, query, PairInfo(src_name=str(src), trg_name=str(trg))
    )
    return Match(src_img, trg_img, pred, bool(module.random_weights))


def _run(args: argparse.Namespace) -> int:
    # `--points` is greedy: key=value items typed after it are config overrides, not points
    points = [_point(p) for p in args.points if "=" not in p]
    overrides = [*args.overrides, *(p for p in args.points if "=" in p)]
    if args.viz:
        from sdzero.records import check_output_path

        check_output_path(args.viz, "--viz")
    match = match_images(args.src, args.trg, points, overrides)
    if args.viz:
        import torch

        from sdzero.records import write_bytes_atomic
        from sdzero.tasks.match_viz import draw_matches
        from sdzero.tasks.viz import png, stamp_random_weights

        lines = [f"{args.src} -> {args.trg}", f"{len(points)} query points"]
        picture = draw_matches(
            match.src_img, match.trg_img, torch.tensor(points), match.pred, None, lines
        )
        if match.random_weights:
            picture = stamp_random_weights(picture)
        write_bytes_atomic(args.viz, png(picture))
    print(json.dumps([[round(x, 2), round(y, 2)] for x, y in match.pred.tolist()]))
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("match", help="match query points of a source image into a target image")
    p.add_argument("src", help="source image file")
    p.add_argument("trg", help="target image file")
    p.add_argument("--points", nargs="+", required=True, help="X,Y pixels of SRC")
    p.add_argument("--viz", help="write a PNG of the numbered query points and their predictions")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. backbone=tiny)")
    p.set_defaults(func=_run)
