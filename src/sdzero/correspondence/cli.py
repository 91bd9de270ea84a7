"""``sdzero match SRC TRG --points X,Y ... [--viz OUT.png] [key=value ...]``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sdzero.errors import InputError


def _point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"--points {text!r}: expected X,Y (pixels of SRC), e.g. 10,20") from None
    return x, y


def match_images(
    src: str | Path, trg: str | Path, points: list[tuple[float, float]], overrides: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match ``points`` ((x, y) pixels of the source file) into the target file.

    ``overrides`` are config items (``backbone=...``, ``method.steps=...``) on top of the default
    backbone and method of ``configs/eval.yaml``. Returns ``(src_img, trg_img, pred (N, 2))`` with the
    predictions in target pixels.
    """
    from datamodules.files import load_rgb
    from sdzero.config import compose
    from sdzero.correspondence.base import PairInfo, check_query_points
    from sdzero.runs import build_method

    if not points:
        raise InputError("--points: give at least one query point, X,Y [X,Y ...]")
    cfg = compose(None, ["data=synthetic_correspondence", *overrides])
    module = build_method(cfg)
    # every input is checked before the model is loaded
    src_img, trg_img = load_rgb(src), load_rgb(trg)
    query = torch.tensor(points, dtype=torch.float32)
    check_query_points(query, src_img.shape[2], src_img.shape[1], f"source image {str(src)!r}")
    module.setup("test")
    pred = module.predict_pair(
        src_img, trg_img, query, PairInfo(src_name=str(src), trg_name=str(trg))
    )
    return src_img, trg_img, pred


def _run(args: argparse.Namespace) -> int:
    # `--points` is greedy: key=value items typed after it are config overrides, not points
    points = [_point(p) for p in args.points if "=" not in p]
    overrides = [*args.overrides, *(p for p in args.points if "=" in p)]
    src_img, trg_img, pred = match_images(args.src, args.trg, points, overrides)
    if args.viz:
        from sdzero.tasks.viz import draw_matches

        draw_matches(src_img, trg_img, torch.tensor(points), pred).save(args.viz)
    print(json.dumps([[round(x, 2), round(y, 2)] for x, y in pred.tolist()]))
    return 0


def register_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("match", help="match query points of a source image into a target image")
    p.add_argument("src", help="source image file")
    p.add_argument("trg", help="target image file")
    p.add_argument("--points", nargs="+", required=True, help="X,Y pixels of SRC")
    p.add_argument("--viz", help="write a PNG with lines between matched points")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. backbone=tiny)")
    p.set_defaults(func=_run)
