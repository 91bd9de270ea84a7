"""sdzero's OVDiff against the official code's own outputs for its model-free stages.

The fixture (``<repo>/../shared/fidelity/ovdiff_components/``, README there) holds what the
official karazijal/sdov lines (commit 218566b) computed on seeded synthetic inputs: attribution
normalisation, CutLER FG/BG ranking (five edge cases), masks on the feature grid, class and
per-image prototypes, the stuff-filtered prototype bank, windows, merged scores and labels. Masks,
counts, windows and labels must match exactly, floats to 1e-5 relative (``max|a - b| / max|b|``).
k-means centres are not compared: sdzero's k-means draws from its own RNG, so only their count is
deterministic.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from sdzero.segmentation.features import FeatureExtractor
from sdzero.segmentation.inference import (
    PrototypeBank,
    Segmenter,
    labels_from_scores,
    sliding_windows,
)
from sdzero.segmentation.masks import rank_instance_masks
from sdzero.segmentation.prototypes import (
    CLASS_MEAN,
    IMAGE_MEAN,
    KMEANS_CENTRE,
    masks_to_grid,
    prototypes_from_features,
)
from sdzero.segmentation.support import normalise_attribution

REPO = Path(__file__).resolve().parents[1]
ROOT = (REPO / ".." / "shared" / "fidelity" / "ovdiff_components").resolve()
TOL = 1e-5
CLASSES = (1, 2, 3, 4)  # cat, dog, car, grass (stuff)

pytestmark = pytest.mark.skipif(
    not (ROOT / "ovdiff_fixture.safetensors").is_file(),
    reason=f"the OVDiff fixture is not at {ROOT} (CI provides ../shared/fidelity/)",
)


def rel(mine: torch.Tensor, ref: torch.Tensor) -> float:
    """``max|mine - ref| / max|ref|``; shapes must agree."""
    a, b = torch.as_tensor(mine).double(), torch.as_tensor(ref).double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} vs official {tuple(b.shape)}"
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def assert_same_mask(mine: torch.Tensor, ref: torch.Tensor) -> None:
    assert mine.shape == ref.shape and mine.dtype == torch.bool
    differ = int((mine != ref).sum())
    assert differ == 0, (
        f"{differ} pixels differ (sdzero {int(mine.sum())}, official {int(ref.sum())})"
    )


@pytest.fixture(scope="module")
def fx() -> dict:
    tensors = load_file(str(ROOT / "ovdiff_fixture.safetensors"))
    meta = json.loads((ROOT / "ovdiff_fixture.json").read_text())
    return {"t": tensors, "meta": meta}


@pytest.fixture(scope="module")
def prototypes(fx) -> dict:
    """sdzero's prototypes of every class, pooled from the official pixel masks."""
    t, names = fx["t"], fx["meta"]["classlist"]
    out = {}
    for c in CLASSES:
        idx = torch.nonzero(t["support/class"] == c).flatten()
        out[c] = prototypes_from_features(
            t["support/features"][idx],
            t["support/fg"][idx],
            t["support/bg"][idx],
            class_name=names[c],
            extractor="fixture",
            kmeans_k=32,
            kmeans_seed=0,
            kmeans_sample=0,
        )
    return out


@pytest.fixture(scope="module")
def bank(fx) -> PrototypeBank:
    """The stuff-filtered bank built from the OFFICIAL rows (so k-means plays no part)."""
    t, meta = fx["t"], fx["meta"]
    rows = {}
    for c in CLASSES:
        fg = torch.cat([t[f"protos/{c}{s}"].view(-1, 16) for s in ("", "_ind", "_kmeans")])
        bg = torch.cat([t[f"protos/{c}{s}"].view(-1, 16) for s in ("_bg", "_bg_ind", "_kmeans_bg")])
        rows[c] = SimpleNamespace(extractor="fixture", fg=fg, bg=bg)
    return PrototypeBank.build(
        rows, stuff=set(meta["stuff"]), stuff_threshold=meta["stuff_threshold"]
    )


# ----------------------------------------------------------------------------- support masks


def test_attribution_normalisation(fx):
    t = fx["t"]
    assert (
        rel(normalise_attribution(t["support/raw_daam"], (512, 512)), t["support/attribution"])
        <= TOL
    )


@pytest.mark.parametrize("side", ["fg", "bg"])
@pytest.mark.parametrize("i", range(10))
def test_fg_bg_ranking(fx, i, side):
    """Typical, fallback and edge cases (empty complement, empty instance, nested lowest mask,
    FG or BG empty on the grid): see ``support_cases`` in the fixture's metadata."""
    t = fx["t"]
    fg, bg = rank_instance_masks(t[f"support/instances/{i}"], t["support/attribution"][i])
    assert_same_mask({"fg": fg, "bg": bg}[side], t[f"support/{side}"][i])


@pytest.mark.parametrize("side", ["fg", "bg"])
def test_masks_on_the_feature_grid(fx, side):
    t = fx["t"]
    grid = masks_to_grid(t[f"support/{side}"], (64, 64))
    assert_same_mask(grid, t[f"grid/{side}"])
    if side == "fg":  # the official skip rule: no FG cell on the grid
        assert torch.equal(~grid.flatten(1).any(1), t["grid/skipped"])


# -------------------------------------------------------------------------------- prototypes


def official_rows(fx, c: int, side: str, kind: str) -> torch.Tensor:
    sfx = "_bg" if side == "bg" else ""
    rows = fx["t"][f"protos/{c}{sfx}" if kind == "mean" else f"protos/{c}{sfx}_ind"]
    rows = rows.view(-1, 16)
    return rows[torch.isfinite(rows).all(-1)]  # the official NaN rows, dropped by build_prototypes


@pytest.mark.parametrize("kind", ["mean", "images"])
@pytest.mark.parametrize("side", ["fg", "bg"])
@pytest.mark.parametrize("c", CLASSES)
def test_class_and_image_prototypes(fx, prototypes, c, side, kind):
    p = prototypes[c]
    rows, kinds, images = (getattr(p, f"{side}{s}") for s in ("", "_kind", "_image"))
    want = official_rows(fx, c, side, kind)
    if kind == "mean":
        assert rel(rows[kinds == CLASS_MEAN], want) <= TOL
        return
    assert rel(rows[kinds == IMAGE_MEAN], want) <= TOL
    # The images pooled, in order (class-local indices): the official pooled images, less those
    # whose background was empty on the grid (NaN rows).
    pooled = fx["meta"]["pooled_images"][str(c)]
    members = torch.nonzero(fx["t"]["support/class"] == c).flatten().tolist()
    if side == "bg":
        bg_grid = fx["t"]["grid/bg"]
        pooled = [i for i in pooled if bg_grid[i].any()]
    assert [members[j] for j in images[kinds == IMAGE_MEAN].tolist()] == pooled
    # k-means: its RNG is sdzero's own, so only the number of centres is deterministic.
    sfx = "_kmeans_bg" if side == "bg" else "_kmeans"
    assert int((kinds == KMEANS_CENTRE).sum()) == len(fx["t"][f"protos/{c}{sfx}"]) == 32


# ---------------------------------------------------------------------- bank, scores, labels


@pytest.mark.parametrize("side", ["fg", "bg"])
def test_bank_counts_after_the_stuff_filter(fx, bank, side):
    want = fx["t"]["bank/mask"][1 if side == "fg" else 0].sum(1)
    assert getattr(bank, f"{side}_counts").tolist() == want.tolist()


@pytest.mark.parametrize("side", ["fg", "bg"])
def test_bank_rows_l2_normalised(fx, bank, side):
    layer = 1 if side == "fg" else 0
    want_rows, want_mask = fx["t"]["bank/prototypes_norm"][layer], fx["t"]["bank/mask"][layer]
    mine = getattr(bank, side)  # every class's kept rows, one class after another
    ref = torch.cat([want_rows[i][want_mask[i]] for i in range(len(CLASSES))])
    assert rel(mine, ref) <= TOL


def test_windows(fx):
    meta = fx["meta"]
    windows = sliding_windows(*meta["working_size"], [48], 48)
    assert [[w.x1, w.y1, w.x2, w.y2] for w in windows] == meta["windows_xyxy"]


class StoredFeatures(FeatureExtractor):
    """A stand-in extractor returning the fixture's features of each window it is given. The test
    image holds each pixel's (x, y) in its red and green channels, so a window's top-left pixel
    and size tell which window it is."""

    name = "fixture"
    dim = 16

    def __init__(self, features: list[torch.Tensor], windows: list[list[int]]) -> None:
        super().__init__()
        self.features = features
        self.windows = windows

    def prepare(self, window: torch.Tensor) -> torch.Tensor:
        return window

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        found = []
        for image in images:
            x1, y1 = (round(float(v) * 255) for v in image[:2, 0, 0])
            found.append(self.features[self.windows.index([x1, y1, x1 + width, y1 + height])])
        return torch.stack(found)


def coordinate_image(height: int, width: int) -> torch.Tensor:
    """``(3, H, W)`` uint8: red = x, green = y, blue = 0."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([xs, ys, torch.zeros_like(xs)]).byte()


@pytest.fixture(scope="module")
def segmentation(fx, bank):
    """sdzero's Segmenter on the fixture's working frame, windows and kept classes."""
    t, meta = fx["t"], fx["meta"]
    height, width = meta["working_size"]
    windows = meta["windows_xyxy"]
    stored = [t[f"test/features/{j}"].permute(2, 0, 1) for j in range(len(windows))]
    segmenter = Segmenter(
        [StoredFeatures(stored, windows)],
        [bank],
        len(meta["classlist"]),
        0,
        window_sizes=[48],
        stride=48,
        short_side=height,
        class_filter=lambda image: meta["kept_final"],  # CLIP's [1, 3] plus the stuff class
    )
    return segmenter(coordinate_image(height, width), out_size=tuple(meta["output_size"]))


def test_merged_scores_in_the_working_frame(fx, segmentation):
    assert segmentation.kept == fx["meta"]["kept_final"]
    assert rel(segmentation.scores, fx["t"]["test/scores_work"]) <= TOL


def test_scores_at_the_output_size(fx, segmentation):
    size = tuple(fx["meta"]["output_size"])
    up = F.interpolate(segmentation.scores[None], size=size, mode="bilinear")[0]
    assert rel(up, fx["t"]["test/scores_out"]) <= TOL


def test_labels(fx, segmentation):
    want = fx["t"]["test/labels"]
    assert torch.equal(segmentation.labels, want)
    # The same from the official merged scores: the argmax rule alone.
    assert torch.equal(labels_from_scores(fx["t"]["test/scores_work"], tuple(want.shape)), want)
