"""GeoAware-SC's test-time pose alignment and window soft-argmax (sdzero.correspondence.refine),
on the synthetic ``mirror`` pairs and against reference computations written here."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from datamodules.spair import SPairDataset
from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence
from sdzero.correspondence.matching import FeatureMatching, FeatureSettings
from sdzero.correspondence.mirror_keypoints import mirrored_queries, partner_map
from sdzero.correspondence.refine import (
    box_mask,
    mirror_box,
    mirror_x,
    mutual_nn_distance,
    nn_distance,
    window_soft_argmax,
)
from sdzero.errors import ConfigError

SIZE = 64


@dataclass(frozen=True)
class ColourSettings(FeatureSettings):
    image_size: int = SIZE


class ColourPosition(FeatureMatching):
    """A deterministic test extractor: per pixel its colour and its (x, y) position in [0, 1]
    times ``position_weight`` (appearance first, position breaks ties)."""

    position_weight = 0.5

    def __init__(self, **settings):
        super().__init__()
        self.settings = ColourSettings(**settings)
        self.calls: list[str] = []

    def features(self, images, names=(), category=""):
        self.calls += list(names)
        b, _, h, w = images.shape
        ys, xs = torch.meshgrid(torch.arange(h) / h, torch.arange(w) / w, indexing="ij")
        where = self.position_weight * torch.stack([xs, ys]).expand(b, 2, h, w)
        return torch.cat([images, where], dim=1)


def pck(method, ds, alpha=0.1) -> float:
    """Per-point PCK: error < alpha * the target box's longer side (original pixels)."""
    hits = total = 0
    for index in range(len(ds)):
        b = ds[index]
        pair = PairInfo(index, b["category"], b["src_name"], b["trg_name"])
        pred = method.predict_pair(b["src_img"], b["trg_img"], b["src_kps"], pair)
        box = b["trg_bbox"]
        bound = alpha * max(box[2] - box[0], box[3] - box[1])
        hits += int(((pred - b["trg_kps"]).norm(dim=1) < bound).sum())
        total += len(pred)
    return hits / total


@pytest.fixture(scope="module")
def mirror_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    write_synthetic_spair(root, num_pairs=8, image_size=SIZE, seed=0, kind="mirror")
    return SPairDataset(root)


@dataclass(frozen=True)
class PixelSettings(ColourSettings):
    match_resolution: str = "image"


class PixelColourPosition(ColourPosition):
    """The same features matched at image resolution (DIFT's rule, pixel-index mirror)."""

    def __init__(self, **settings):
        super().__init__()
        self.settings = PixelSettings(**settings)


@pytest.mark.parametrize("extractor", [ColourPosition, PixelColourPosition])
def test_flip_alignment_recovers_mirrored_pairs_that_plain_matching_swaps(mirror_pairs, extractor):
    plain = pck(extractor(), mirror_pairs)
    aligned_method = extractor(flip_align=True)
    aligned = pck(aligned_method, mirror_pairs)
    # 34 points: 26 on twin parts, 8 heads. Plain matching sends every twin to its twin (errors
    # of 13-31 px against bounds of 2-4 px) and hits 3 heads; the mirrored source hits all
    assert plain == pytest.approx(3 / 34)
    assert aligned == 1.0
    assert aligned_method.flips == (8, 8)
    # the mirrored source is extracted under its own name (distinct feature-cache entries)
    assert "JPEGImages/discs/2000_000000.jpg#flip" in aligned_method.calls


def test_flip_alignment_keeps_the_source_when_the_flip_is_not_strictly_better():
    # a left/right symmetric image: both orientations score the same, the source is kept
    img = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    img[0, 16:48, 8:24] = 255
    img[0, 16:48, 40:56] = 255
    shifted = torch.roll(img, 2, dims=1)
    method = ColourPosition(flip_align=True)
    points = torch.tensor([[12.0, 20.0], [50.0, 30.0]])
    got = method.predict_pair(img, shifted, points, PairInfo())
    assert method.flips == (0, 1)
    assert torch.equal(got, ColourPosition().predict_pair(img, shifted, points, PairInfo()))


def test_mirror_x_and_orientation_scores_equal_reference_values():
    assert torch.equal(mirror_x(torch.tensor([[3.0, 5.0]]), 64.0), torch.tensor([[61.0, 5.0]]))
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn((5, 3, 4), generator=gen), torch.randn((5, 2, 3), generator=gen)
    ua = F.normalize(a.flatten(1).T, dim=1)
    ub = F.normalize(b.flatten(1).T, dim=1)
    dist = [[(ua[i] - ub[j]).norm().item() for j in range(6)] for i in range(12)]
    assert nn_distance(a, b) == pytest.approx(sum(min(r) for r in dist) / 12, rel=1e-5)
    to_b = [min(range(6), key=lambda j, r=r: r[j]) for r in dist]
    to_a = [min(range(12), key=lambda i, j=j: dist[i][j]) for j in range(6)]
    mutual = [min(dist[i]) for i in range(12) if to_a[to_b[i]] == i]
    assert mutual_nn_distance(a, b) == pytest.approx(sum(mutual) / len(mutual), rel=1e-5)
    assert nn_distance(a, a) == pytest.approx(0.0, abs=1e-3)


def official_masked_distance(a, b, mask_a, mask_b, grid):
    """``get_distance`` written out: unit descriptors resized bilinearly to ``grid`` (not
    renormalised), multiplied by the masks, every exact 0 set to -100000 (masked-out target
    cells lie far from everything), and for each source cell in its mask the distance to the
    nearest target cell, averaged."""

    def prep(x, m):
        x = F.normalize(x, dim=0)[None]
        x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=False)[0]
        x = x * m.float()
        x[x == 0] = -100000.0
        return x.flatten(1).T

    pa, pb = prep(a, mask_a), prep(b, mask_b)
    rows = [
        torch.linalg.norm(pb - pa[i], dim=1).min() for i in range(len(pa)) if mask_a.flatten()[i]
    ]
    return float(torch.stack(rows).mean())


def test_masked_nn_distance_equals_the_official_computation():
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn((6, 5, 5), generator=gen), torch.randn((6, 5, 5), generator=gen)
    box_a, box_b = (8.0, 4.0, 30.0, 20.0), (0.0, 10.0, 40.0, 40.0)
    mask_a, mask_b = box_mask(box_a, (7, 7), 40), box_mask(box_b, (7, 7), 40)
    got = nn_distance(a, b, mask_a, mask_b, grid=7)
    assert got == pytest.approx(official_masked_distance(a, b, mask_a, mask_b, 7), rel=1e-5)
    # masks matter: the whole grid gives another distance
    assert nn_distance(a, b, grid=7) != pytest.approx(got, rel=1e-3)


def test_box_masks_hold_the_cells_whose_centres_lie_in_the_box():
    # a 4 x 4 grid over 40 px: centres 5, 15, 25, 35
    mask = box_mask((10.0, 0.0, 25.0, 15.0), (4, 4), 40)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0:2, 1:3] = True
    assert torch.equal(mask, want)
    assert box_mask(None, (3, 2), 40).all() and box_mask((1.0, 1.0, 2.0, 2.0), (4, 4), 40).all()
    assert mirror_box((10.0, 2.0, 25.0, 15.0), 40) == (15.0, 2.0, 30.0, 15.0)


def test_mirrored_queries_swap_partners_and_gate_on_the_partner():
    points = torch.tensor([[1.0, 5.0], [2.0, 6.0], [3.0, 7.0], [4.0, 8.0], [9.0, 9.0]])
    partners = partner_map("spair", "cat")  # cat: 0-1, 2-3, 4-5, 6-7, 9-10, 11-12; 8 on the axis
    assert partners[1] == 0 and 8 not in partners
    # ids 0 and 1 are partners, 8 has none, 4's partner 5 is not in the pair; a grid point last
    queries, takes = mirrored_queries(points, 10.0, [0, 1, 8, 4], partners)
    assert queries.tolist() == [[8.0, 6.0], [9.0, 5.0], [7.0, 7.0], [6.0, 8.0], [1.0, 9.0]]
    assert takes.tolist() == [True, True, True, False, True]
    plain, every = mirrored_queries(points, 10.0, None, partner_map("none", "cat"))
    assert torch.equal(plain, mirror_x(points, 10.0)) and every.all()
    with pytest.raises(ValueError, match="keypoint ids"):
        mirrored_queries(points[:2], 10.0, [0, 1, 8], partners)


def test_the_flip_score_reads_the_boxes_in_the_model_frame_the_source_box_mirrored():
    method = ColourPosition(flip_align=True, flip_mask="box")
    seen = []

    def record(src_desc, trg_desc, src_box, trg_box):
        seen.append((src_box, trg_box))
        return 1.0

    method.orientation_distance = record
    src = torch.zeros(3, 32, 16, dtype=torch.uint8)  # h 32, w 16: stretched x4 across, x2 down
    trg = torch.zeros(3, 64, 64, dtype=torch.uint8)
    pair = PairInfo(src_bbox=(2.0, 4.0, 6.0, 20.0), trg_bbox=(10.0, 11.0, 30.0, 40.0))
    method.predict_pair(src, trg, torch.tensor([[3.0, 5.0]]), pair)
    target = (10.0, 11.0, 30.0, 40.0)
    assert seen == [((40.0, 8.0, 56.0, 40.0), target), ((8.0, 8.0, 24.0, 40.0), target)]


def test_pair_info_reads_boxes_and_keypoint_ids_from_a_sample():
    sample = {
        "index": 3,
        "category": "cat",
        "src_bbox": torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "trg_bbox": torch.full((4,), float("nan")),
        "extra": {"kps_ids": [4, 0]},
    }
    pair = PairInfo.of(sample)
    assert (pair.src_bbox, pair.trg_bbox, pair.kps_ids) == ((1.0, 2.0, 3.0, 4.0), None, (4, 0))
    assert PairInfo.of({"index": 0, "category": ""}).kps_ids is None


def reference_soft_argmax(scores, h, w, window, temperature):
    """The official rule written out per query: zero outside the clipped window around the
    argmax, softmax over all cells with the temperature, expected cell centre."""
    out = []
    for row in scores:
        grid = row.view(h, w)
        by, bx = divmod(int(row.argmax()), w)
        kept = torch.zeros(h, w)
        for y in range(max(0, by - window), min(h, by + window + 1)):
            for x in range(max(0, bx - window), min(w, bx + window + 1)):
                kept[y, x] = grid[y, x]
        p = torch.exp((kept - kept.max()) / temperature)
        p = p / p.sum()
        xs = sum(float(p[:, x].sum()) * (x + 0.5) for x in range(w))
        ys = sum(float(p[y, :].sum()) * (y + 0.5) for y in range(h))
        out.append([xs, ys])
    return torch.tensor(out)


def test_window_soft_argmax_equals_the_reference_computation():
    scores = torch.rand((6, 7 * 9), generator=torch.Generator().manual_seed(2)) * 2 - 1
    for window, temperature in ((0, 0.02), (1, 0.1), (2, 0.5), (5, 0.02)):
        got = window_soft_argmax(scores, (7, 9), window, temperature)
        ref = reference_soft_argmax(scores, 7, 9, window, temperature)
        assert torch.allclose(got, ref, atol=1e-5)


def test_window_soft_argmax_is_exact_on_one_hot_maps_and_clipped_at_borders():
    onehot = torch.zeros((3, 8 * 8))
    onehot[0, 3 * 8 + 5] = onehot[1, 0] = onehot[2, 63] = 1.0
    got = window_soft_argmax(onehot, (8, 8), 2, 0.02)
    assert torch.allclose(got, torch.tensor([[5.5, 3.5], [0.5, 0.5], [7.5, 7.5]]), atol=1e-6)
    # a flat score of 1 in a corner's window: the 3x3 cells inside the grid share the weight
    # (the window is clipped, not padded), cells outside it hold 0 and weigh exp(-50) each
    flat = torch.full((1, 64), -1.0)
    flat[0, [0, 1, 2, 8, 9, 10, 16, 17, 18]] = 1.0
    flat[0, 0] = 1.0 + 1e-6
    assert torch.allclose(
        window_soft_argmax(flat, (8, 8), 2, 0.02), torch.tensor([[1.5, 1.5]]), atol=1e-4
    )


class ColourOnly(ColourPosition):
    position_weight = 0.0


def test_soft_argmax_matching_reports_the_expected_cell_centre_in_pixels():
    # a green 3x3 block on black: cosine 1 on its 9 pixels, 0 elsewhere; the hard argmax is its
    # first pixel in row-major order, the window soft-argmax its centre pixel's centre
    src = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    src[1, 20:23, 40:43] = 255
    trg = torch.roll(src, (6, -4), dims=(1, 2))
    points = torch.tensor([[41.0, 21.0]])
    soft = ColourOnly(soft_argmax_window=2).predict_pair(src, trg, points, PairInfo())
    hard = ColourOnly().predict_pair(src, trg, points, PairInfo())
    assert torch.allclose(hard, torch.tensor([[36.5, 26.5]]))
    assert torch.allclose(soft, torch.tensor([[37.5, 27.5]]), atol=1e-4)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"flip_score": "cosine"}, "method.flip_score"),
        ({"soft_argmax_window": -1}, "method.soft_argmax_window"),
        ({"soft_argmax_window": 1.5}, "method.soft_argmax_window"),
        ({"soft_argmax_temperature": 0.0}, "method.soft_argmax_temperature"),
        ({"flip_mask": "sam"}, "method.flip_mask"),
        ({"flip_keypoints": "pascal"}, "method.flip_keypoints"),
        ({"flip_grid": -1}, "method.flip_grid"),
        ({"flip_score": "mutual_nn", "flip_mask": "box"}, "method.flip_score=mutual_nn"),
        ({"flip_score": "mutual_nn", "flip_grid": 64}, "method.flip_score=mutual_nn"),
    ],
)
def test_settings_errors_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key):
        ColourSettings(**settings)


def test_soft_argmax_needs_cell_matching():
    with pytest.raises(ConfigError, match="match_resolution=cell"):
        PixelSettings(soft_argmax_window=3)


class OwnRule(ColourPosition):
    def match(self, src, trg, points, pair):
        return points


def test_a_method_with_its_own_match_refuses_the_options_at_setup():
    with pytest.raises(ConfigError, match="not supported by OwnRule"):
        OwnRule(flip_align=True).setup("test")


# ------------------------------------------------ ldm_corr: the flipped-target variant


def _ldm_cfg(**kw):
    base = dict(image_size=128, steps=2, num_embeddings=1, inference_crops=5, lr=0.05)
    return FitConfig(**{**base, **kw})


def _peaked(n: int, x: int, y: int, height: float) -> torch.Tensor:
    """``(n, 1, 128, 128)`` one-layer maps, 0 but ``height`` at pixel ``(x, y)``."""
    maps = torch.zeros((n, 1, 128, 128))
    maps[..., y, x] = height
    return maps


def test_flip_target_is_off_by_default_and_keeps_the_strictly_sharper_orientation(sd):
    assert FitConfig().flip_target is False
    src = torch.rand((1, 3, 128, 128), generator=torch.Generator().manual_seed(0))
    trg = torch.rand((1, 3, 128, 128), generator=torch.Generator().manual_seed(1))
    points = torch.tensor([[20.0, 30.0], [70.0, 90.0]])
    for original, mirrored, flipped in ((2.0, 5.0, True), (5.0, 2.0, False), (3.0, 3.0, False)):
        pc = PromptCorrespondence(sd, _ldm_cfg(steps=0, flip_target=True))
        draws = []

        def infer(image, cond, gens, latents=None, o=original, m=mirrored, draws=draws):
            draws.append([float(torch.rand(1, generator=g)) for g in gens])
            is_mirror = torch.equal(image, trg.flip(-1))
            # original peak at x=10, mirrored at x=100 (same row)
            return _peaked(len(gens), 100 if is_mirror else 10, 40, m if is_mirror else o)

        pc.infer = infer
        pred = pc.match(src, trg, points, seed=0)
        assert pc.target_flipped is flipped
        expected = 128 - 100.5 if flipped else 10.5  # mirrored back: x -> S - x
        assert pred.tolist() == [[expected, 40.5]] * 2
        assert draws[0] == draws[1]  # both orientations see the same random draws


def test_flip_target_on_the_tiny_backbone_equals_matching_the_mirrored_target(sd, mirror_pairs):
    """Random weights: no accuracy claim, only the rule. On a mirrored pair, flip_target's answer
    is plain matching's on the target or, mirrored back, on the mirrored target (same draws)."""
    b = mirror_pairs[0]
    src, trg = (b[k][None].float() / 255 for k in ("src_img", "trg_img"))
    src, trg = (F.interpolate(t, size=128, mode="bilinear") for t in (src, trg))
    points = b["src_kps"][:2] * 2
    plain = PromptCorrespondence(sd, _ldm_cfg())
    on_target = plain.match(src, trg, points, seed=0, index=3)
    on_mirror = mirror_x(plain.match(src, trg.flip(-1), points, seed=0, index=3), 128)
    flip = PromptCorrespondence(sd, _ldm_cfg(flip_target=True))
    got = flip.match(src, trg, points, seed=0, index=3)
    assert torch.equal(got, on_mirror if flip.target_flipped else on_target)
    assert not torch.equal(on_target, on_mirror)
