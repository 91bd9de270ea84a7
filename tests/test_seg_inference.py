"""OVDiff inference: window grid, ensembling, background logic, labels, PAMR, explanations."""

import pytest
import torch
import torch.nn.functional as F

from sdzero.segmentation.explain import explain_pixel, render_explanation, winner_at, winner_maps
from sdzero.segmentation.features import FeatureExtractor
from sdzero.segmentation.inference import (
    PrototypeBank,
    ScoreAccumulator,
    Segmenter,
    Window,
    labels_from_scores,
    resize_short_side,
    sliding_windows,
)
from sdzero.segmentation.pamr import pamr, pamr_affinity
from sdzero.segmentation.prototypes import Prototypes


def make_prototypes(name, fg, bg, extractor="colour", grid=(4, 4)):
    """Prototypes of one class from (P, D) / (Q, D) rows; row k comes from support image k."""
    fg, bg = torch.as_tensor(fg, dtype=torch.float32), torch.as_tensor(bg, dtype=torch.float32)
    region = torch.zeros(grid, dtype=torch.bool)
    region[1:3, 1:3] = True
    return Prototypes(
        class_name=name,
        extractor=extractor,
        fg=fg,
        bg=bg,
        fg_kind=torch.full((len(fg),), 1, dtype=torch.int8),
        bg_kind=torch.full((len(bg),), 1, dtype=torch.int8),
        fg_image=torch.arange(len(fg)),
        bg_image=torch.arange(len(bg)),
        fg_region=region.expand(len(fg), *grid).clone(),
        bg_region=(~region).expand(len(bg), *grid).clone(),
        support=[f"/nonexistent/{name}/{k}.png" for k in range(max(len(fg), len(bg)))],
    )


class PixelColour(FeatureExtractor):
    """A stand-in extractor: the mean RGB of 8x8 cells, centred (so grey is the zero vector)."""

    name = "colour"

    def prepare(self, windows):
        return windows

    def forward(self, images):
        return F.avg_pool2d(images, 8) - 0.5


# ------------------------------------------------------------------------------------ windows


def test_window_grid_of_a_448x600_image_matches_the_official_count_and_covers_every_pixel():
    windows = sliding_windows(448, 600, (448, 336), 224)
    # 448: 1 row x 2 columns; 336: 2 rows x 3 columns; plus the full image.
    assert len(windows) == 2 + 6 + 1
    assert windows[:2] == [Window(0, 0, 448, 448), Window(152, 0, 600, 448)]
    assert windows[2:8] == [
        Window(0, 0, 336, 336),
        Window(224, 0, 560, 336),
        Window(264, 0, 600, 336),  # the last column ends flush with the border
        Window(0, 112, 336, 448),
        Window(224, 112, 560, 448),
        Window(264, 112, 600, 448),
    ]
    assert windows[-1] == Window(0, 0, 600, 448)
    cover = torch.zeros(448, 600)
    for w in windows[:-1]:
        assert w.size in {(448, 448), (336, 336)}
        cover[w.y1 : w.y2, w.x1 : w.x2] += 1
    assert cover.min() >= 1


def test_windows_larger_than_the_image_shrink_to_it():
    assert sliding_windows(200, 300, (448,), 224) == [Window(0, 0, 300, 200)] * 2


def test_resize_short_side_matches_torchvision_int_rounding():
    image = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    assert resize_short_side(image, 448).shape == (3, 448, 597)
    assert resize_short_side(image.transpose(1, 2), 448).shape == (3, 597, 448)
    with pytest.raises(ValueError, match="uint8"):
        resize_short_side(image.float(), 448)


# ------------------------------------------------------------------------------- ensembling


def test_accumulator_averages_every_pair_covering_a_pixel_after_clamping():
    acc = ScoreAccumulator(2, 4, 6)
    acc.add(Window(0, 0, 4, 4), torch.full((2, 2, 2), 0.2))
    acc.add(Window(2, 0, 6, 4), torch.full((2, 1, 1), 0.6))
    acc.add(Window(0, 0, 6, 4), torch.full((2, 3, 3), 5.0))  # clamped to 1
    mean = acc.mean()
    assert torch.allclose(mean[:, :, :2], torch.full((2, 4, 2), (0.2 + 1) / 2))
    assert torch.allclose(mean[:, :, 2:4], torch.full((2, 4, 2), (0.2 + 0.6 + 1) / 3))
    assert torch.allclose(mean[:, :, 4:], torch.full((2, 4, 2), (0.6 + 1) / 2))


def test_labels_upsample_scores_not_labels_and_ties_go_to_background():
    # Class 3 is never the best at either source pixel, but wins where the scores are blended.
    scores = torch.tensor([[[0.9, 0.0]], [[0.0, 0.9]], [[0.6, 0.6]]])
    scores = torch.cat([torch.zeros(1, 1, 2), scores])  # background channel 0
    assert labels_from_scores(scores, (1, 5)).tolist() == [[1, 1, 3, 2, 2]]
    negative = torch.tensor([[[-0.5]], [[-0.2]], [[0.0]]])
    assert labels_from_scores(negative, (2, 2)).tolist() == [[0, 0], [0, 0]]


# --------------------------------------------------------------------------- background logic


def bank_and_features():
    """Three classes in 3-d: fg along the axes; bg of class 1 along -x, of class 2 along -y."""
    protos = {
        1: make_prototypes("a", [[1, 0, 0]], [[-1, 0, 0], [0, 0, -1]]),
        2: make_prototypes("b", [[0, 1, 0], [0, 2, 1]], [[0, -1, 0]]),
        3: make_prototypes("c", [[0, 0, 1]], [[1, 1, 1]]),
    }
    features = F.normalize(torch.tensor([-1.0, -0.1, 0.0]).view(1, 3, 1, 1), dim=1)
    return PrototypeBank.build(protos), features


def test_background_channel_is_the_max_over_the_kept_classes_background_prototypes():
    bank, features = bank_and_features()
    s = bank.score(features, [1, 2])
    cos_a_bg = float(F.normalize(torch.tensor([-1.0, -0.1, 0.0]), dim=0)[0] * -1)
    assert s.bg.item() == pytest.approx(cos_a_bg)
    assert (s.bg_owner.item(), s.bg_arg.item()) == (1, 0)
    # Class 1 filtered out: its background prototypes leave the background channel.
    s = bank.score(features, [2, 3])
    assert s.bg.item() == pytest.approx(
        float(F.normalize(torch.tensor([-1.0, -0.1, 0.0]), dim=0)[1] * -1)
    )
    assert (s.bg_owner.item(), s.bg_arg.item()) == (2, 0)
    # FG: the max over the class's prototypes, with the winning row.
    fg_b = F.normalize(torch.tensor([[0.0, 1, 0], [0, 2, 1]]), dim=1) @ F.normalize(
        torch.tensor([-1.0, -0.1, 0.0]), dim=0
    )
    assert s.fg[0, 0].item() == pytest.approx(fg_b.max().item())
    assert s.fg_arg[0, 0].item() == int(fg_b.argmax())


def test_filtered_out_classes_score_minus_one_and_background_wins_without_positive_scores():
    protos = {1: make_prototypes("red", [[0.5, -0.5, -0.5]], [[-0.5, 0.0, 0.0]])}
    protos[2] = make_prototypes("green", [[-0.5, 0.5, -0.5]], [[0.0, 0.0, 0.5]])
    image = torch.zeros(3, 64, 96, dtype=torch.uint8)
    image[0, :, 48:] = 255  # right half red, left half black
    segmenter = Segmenter(
        [PixelColour()],
        [PrototypeBank.build(protos)],
        3,
        window_sizes=(64,),
        stride=32,
        short_side=64,
        class_filter=lambda img: [1],
    )
    seg = segmenter(image)
    assert torch.all(seg.scores[2] == -1)
    assert seg.kept == [1]
    assert (seg.labels[:, 52:] == 1).all() and (seg.labels[:, :44] == 0).all()


# ------------------------------------------------------------------------ end to end, explain


def test_segmenter_known_answer_and_explanation(tmp_path):
    protos = {
        1: make_prototypes("red", [[0.5, -0.5, -0.5], [0.4, -0.5, -0.5]], [[-0.5, -0.5, -0.5]]),
        2: make_prototypes("blue", [[-0.5, -0.5, 0.5]], [[-0.5, -0.4, -0.5], [0.5, 0.5, 0.5]]),
    }
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)  # black background
    image[0, 16:64, 16:80] = 255
    image[2, 64:112, 96:152] = 255
    truth = torch.zeros(120, 160, dtype=torch.long)
    truth[16:64, 16:80], truth[64:112, 96:152] = 1, 2
    segmenter = Segmenter(
        [PixelColour()],
        [PrototypeBank.build(protos)],
        3,
        window_sizes=(96, 64),
        stride=48,
        short_side=96,
    )
    seg = segmenter(image, explain=True)
    assert seg.labels.shape == (120, 160)
    assert (seg.labels == truth).float().mean() > 0.97
    maps = winner_maps(seg)
    assert maps["owner"].shape == seg.scores.shape[-2:]
    w = winner_at(seg, 40, 40)
    assert (w.label, w.owner, w.side, w.prototype) == (1, 1, "fg", 0)
    w = winner_at(seg, 5, 100)  # black background: class 1's (-0.5, -0.5, -0.5) bg prototype
    assert (w.label, w.owner, w.side, w.prototype) == (0, 1, "bg", 0)
    assert w.score == pytest.approx(1.0, abs=1e-4)
    explanation = explain_pixel(
        seg, 120, 90, {c: {"colour": p} for c, p in protos.items()}, ["bg", "red", "blue"]
    )
    assert explanation.label_name == "blue" and explanation.kind == "per-image mean"
    assert explanation.support_image == "/nonexistent/blue/0.png"
    render_explanation(image, explanation, tmp_path / "why.png")
    assert (tmp_path / "why.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="outside"):
        winner_at(seg, 160, 0)


def test_segmenter_rejects_banks_not_covering_the_classes():
    bank = PrototypeBank.build({1: make_prototypes("a", [[1, 0, 0]], [[0, 1, 0]])})
    with pytest.raises(ValueError, match=r"cover classes \[1\], expected \[1, 2\]"):
        Segmenter([PixelColour()], [bank], 3)


# ---------------------------------------------------------------------------------------- PAMR


def test_pamr_keeps_a_constant_map_constant_and_weights_sum_to_one():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 20, 24) * 255
    weights = pamr_affinity(image, (1, 2, 4))
    assert weights.shape == (1, 24, 20, 24)
    assert torch.allclose(weights.sum(1), torch.ones(1, 20, 24), atol=1e-5)
    constant = torch.full((1, 2, 20, 24), 0.37)
    assert torch.allclose(pamr(image, constant, 10, (1, 2, 4)), constant, atol=1e-5)


def test_pamr_sharpens_a_blurred_edge_along_the_image_edge():
    image = torch.zeros(1, 3, 32, 32)
    image[..., 16:] = 255.0
    image += torch.rand(image.shape, generator=torch.Generator().manual_seed(0))  # faint noise
    step = (torch.arange(32) >= 16).float().expand(1, 1, 32, 32)
    blurred = F.avg_pool1d(step.reshape(32, 1, 32), 9, stride=1, padding=4, count_include_pad=False)
    blurred = blurred.reshape(1, 1, 32, 32)
    refined = pamr(image, blurred, 10, (1, 2, 4, 8))

    def jump(maps):
        return (maps[..., 16] - maps[..., 15]).mean().item()

    assert jump(blurred) == pytest.approx(1 / 9)
    assert jump(refined) > 0.85  # the ramp became a step where the image has its edge
    assert (refined - step).abs().mean() < 0.5 * (blurred - step).abs().mean()
    assert refined.min() >= blurred.min() - 1e-6 and refined.max() <= blurred.max() + 1e-6


def test_pamr_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="must share"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 2, 4, 4))
