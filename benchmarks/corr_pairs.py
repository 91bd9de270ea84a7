"""Per-pair accounting of the correspondence loop on SPair-71k's real points per pair.

``data/spair_test360_points.json`` holds the query points of the 360 SPair-71k test pairs that
Diffusion Hyperfeatures samples (20 per category; 2,529 source points, 1 to 16 a pair, mean 7.0),
derived by ``python -m benchmarks.corr_pairs DHF_JSON`` from that list (source and target points in
original pixels, no image sizes). The model frame stretches an image to 512², so a point's frame
position needs the image size the list lacks: PASCAL images are 500 px on their longer side, and
the shorter side is taken as 375 (the commonest) or the annotations' extent if larger, landscape
unless the annotations reach below y = 375. Only points within 106 px of a frame border (where the
crop range narrows) depend on that assumption.

A pair's work: each of its points is fitted with 5 restarts x 129 steps and inferred over 5 x 20
target crops; the VAE encodes each distinct crop of the pair once (the latent cache), so the
encodes of a pair are the distinct boxes of its real random draws (:func:`distinct_crops`).
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from sdzero.correspondence.crop_plan import fit_boxes, inference_boxes
from sdzero.correspondence.fitting import item_generator

STEPS, RESTARTS, CROPS = 129, 5, 20  # the official defaults
POINTS = Path(__file__).resolve().parent / "data" / "spair_test360_points.json"
SHORT, LONG = 375, 500


@dataclass(frozen=True)
class Pair:
    """One pair's query points ``(N, 2)`` and target points ``(N, 2)``, model frame (x, y) / S."""

    category: str
    source: torch.Tensor
    target: torch.Tensor


def _image_size(points: list[list[float]], box: list[float]) -> tuple[int, int]:
    """(W, H) of a PASCAL image from its annotations (module docstring)."""
    x_extent = max([p[0] for p in points] + [box[2]]) + 1
    y_extent = max([p[1] for p in points] + [box[3]]) + 1
    if y_extent > SHORT and x_extent <= SHORT:
        return max(SHORT, round(x_extent)), LONG
    if y_extent > SHORT:
        return LONG, LONG
    return LONG, max(SHORT, round(y_extent))


def derive(dhf_list: Path) -> list[dict]:
    """The points file's records from Diffusion Hyperfeatures' SPair list (``[x, y]`` points,
    ``[l, t, r, b]`` boxes): points as fractions of the assumed image size."""
    records = []
    for pair in json.loads(dhf_list.read_text()):
        rec = {"category": pair["category"]}
        for side in ("source", "target"):
            w, h = _image_size(pair[f"{side}_points"], pair[f"{side}_bounding_box"])
            rec[side] = [[round(x / w, 5), round(y / h, 5)] for x, y in pair[f"{side}_points"]]
        records.append(rec)
    return records


def load_pairs(size: int = 512) -> list[Pair]:
    """The 360 pairs, points in the ``size``² model frame."""
    return [
        Pair(
            r["category"],
            torch.tensor(r["source"], dtype=torch.float32) * size,
            torch.tensor(r["target"], dtype=torch.float32) * size,
        )
        for r in json.loads(POINTS.read_text())["pairs"]
    ]


def recorded_work() -> PairWork:
    """The points and distinct encodes of the 360 pairs at the defaults (512 px, seed 0), as
    ``__main__`` recorded them (replaying 2,529 points' draws takes minutes)."""
    data = json.loads(POINTS.read_text())
    return PairWork([len(r["source"]) for r in data["pairs"]], data["encodes"])


def points_per_pair() -> dict[int, int]:
    """How many of the 360 pairs have each number of query points."""
    counts: dict[int, int] = {}
    for pair in load_pairs():
        counts[len(pair.source)] = counts.get(len(pair.source), 0) + 1
    return dict(sorted(counts.items()))


def summary(pairs: list[Pair]) -> str:
    n = [len(p.source) for p in pairs]
    return (
        f"{len(pairs)} SPair-71k test pairs, {sum(n)} points, {min(n)}-{max(n)} a pair, "
        f"mean {statistics.fmean(n):.2f}"
    )


def distinct_crops(pc, pair: Pair, index: int, seed: int = 0) -> tuple[int, int]:
    """Distinct (source, target) crops ``pc.match`` encodes for ``pair`` as dataset sample
    ``index``: the real draws of its items replayed (:mod:`sdzero.correspondence.crop_plan`); the
    target's crops after the 4 corners as if every map peaked at the annotated target point."""
    e = pc.cfg.num_embeddings
    items = [(p, j) for p in range(len(pair.source)) for j in range(e)]
    gens = [item_generator(seed, index, p, j) for p, j in items]
    src = pair.source[[p for p, _ in items]]
    trg = pair.target[[p for p, _ in items]].floor() + 0.5  # peaks sit at pixel centres
    groups = [p for p, _ in items]
    n_src = len(set(fit_boxes(pc, src, gens, groups)))
    n_trg = len(set(inference_boxes(pc, src, trg, gens)))
    return n_src, n_trg


@dataclass(frozen=True)
class PairWork:
    """Points and encodes of each pair of a list (:func:`pair_work`)."""

    points: list[int]
    encodes: list[int]  # distinct crops encoded per pair, source + target

    def seconds(self, per_point: float, per_encode: float) -> list[float]:
        """Seconds of each pair: its points' UNet work plus its encodes."""
        return [
            n * per_point + k * per_encode for n, k in zip(self.points, self.encodes, strict=True)
        ]


def pair_work(pc, pairs: list[Pair]) -> PairWork:
    """The points and distinct encodes of every pair (a pair's index is its list position)."""
    counts = [sum(distinct_crops(pc, pair, i)) for i, pair in enumerate(pairs)]
    return PairWork([len(p.source) for p in pairs], counts)


def main(dhf_list: Path) -> None:
    """Write :data:`POINTS`: the pairs, and their distinct encodes at the defaults."""
    from types import SimpleNamespace

    from sdzero.correspondence.fit_config import FitConfig
    from sdzero.correspondence.fitting import PromptCorrespondence

    POINTS.parent.mkdir(exist_ok=True)
    POINTS.write_text(json.dumps({"pairs": derive(dhf_list), "encodes": []}))
    # the draws need only the UNet's conditioning width (SD 1.x: 768), no weights
    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=768))
    pc = PromptCorrespondence(SimpleNamespace(unet=unet), FitConfig())
    work = pair_work(pc, load_pairs())
    data = {"source": f"Diffusion Hyperfeatures' {dhf_list.name}", "config": "FitConfig(), seed 0"}
    data.update(pairs=derive(dhf_list), encodes=work.encodes)
    POINTS.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(summary(load_pairs()), f"{sum(work.encodes)} encodes ->", POINTS)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
