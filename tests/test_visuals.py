"""The result pictures: what they classify, list and stamp, checked with numbers on hand-made
samples (markers at known pixels, legends against hand-counted classes, the overlay against the
blend formula)."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.synthetic_segmentation import SyntheticVOCDataset, write_synthetic_voc
from sdzero.callbacks import Visuals, uses_random_weights
from sdzero.cli import main
from sdzero.tasks.correspondence import CorrespondenceTask, Scoring
from sdzero.tasks.label_viz import (
    OVERLAY_ALPHA,
    blend,
    class_legend,
    class_palette,
    draw_segmentation,
    image_iou,
    overlay_legend,
)
from sdzero.tasks.match_viz import CORRECT, NEUTRAL, WRONG, draw_matches, match_legend
from sdzero.tasks.viz import (
    MIN_SIDE,
    PAD,
    RANDOM_WEIGHTS_STAMP,
    STAMP_RED,
    stamp_height,
    stamp_lines,
    stamp_random_weights,
    text_width,
)

# A 100 x 80 target whose box has a 50 px longer side: alpha 0.1 tolerates 5 px.
OFFSETS = [0.0, 4.9, 5.0, 5.1, 20.0]  # x error of each prediction, in target pixels
GT = [[10.0, 10.0], [60.0, 10.0], [10.0, 45.0], [60.0, 45.0], [35.0, 65.0]]


def pair(offsets=OFFSETS, gt=GT):
    trg_kps = torch.tensor(gt)
    batch = {
        "index": 0,
        "id": "p0",
        "category": "cat",
        "src_img": torch.zeros(3, 80, 100, dtype=torch.uint8),
        "trg_img": torch.full((3, 80, 100), 128, dtype=torch.uint8),
        "src_kps": torch.tensor(GT),
        "trg_kps": trg_kps,
        "src_bbox": torch.tensor([0.0, 0.0, 50.0, 40.0]),
        "trg_bbox": torch.tensor([0.0, 0.0, 50.0, 40.0]),
        "src_size": (100, 80),
        "trg_size": (100, 80),
    }
    pred = trg_kps + torch.tensor([[dx, 0.0] for dx in offsets])
    return batch, pred


def task(frame="original", inclusive=True, image_size=64):
    scoring = Scoring("bbox-target", frame, (0.05, 0.1, 0.15), inclusive, image_size, "stretch")
    return CorrespondenceTask(scoring, ["cat"])


@pytest.mark.parametrize(("inclusive", "correct"), [(True, 3), (False, 2)])
def test_drawn_points_are_classified_by_the_metrics_own_rule(inclusive, correct):
    """0, 4.9 and (inclusive) 5.0 px errors are within 0.1 x 50 px; the metric counts the same."""
    t = task(inclusive=inclusive)
    batch, pred = pair()
    record = t.record(batch, pred)
    t.update(record, batch)
    row = t.metric.alphas.index(0.1)
    assert int(t.metric.correct.sum(0)[row]) == correct
    outcome = t.outcome(record, batch)
    assert outcome.alpha == 0.1 and outcome.tolerance == (5.0, 5.0)
    assert outcome.states() == [True, True, inclusive, False, False]
    labels = [e.label for e in match_legend(outcome)]
    assert f"correct prediction ({correct})" in labels
    assert f"wrong prediction ({5 - correct})" in labels
    # without a title the target panel starts at the enlarged source's width + PAD, row 0
    picture = draw_matches(batch["src_img"], batch["trg_img"], batch["src_kps"], pred, outcome)
    scale = MIN_SIDE / 100
    x0 = round(100 * scale) + PAD
    for (x, y), state in zip(pred.tolist(), outcome.states(), strict=True):
        centre = (round(x0 + x * scale), round(y * scale))
        assert picture.getpixel(centre) == (CORRECT if state else WRONG)


def test_the_title_gives_the_pairs_pck_at_every_alpha():
    t = task()
    batch, pred = pair()
    record = t.record(batch, pred)
    # 0.05 tolerates 2.5 px (1 point), 0.1 5 px (3), 0.15 7.5 px (4)
    assert t.visual_title(record) == [
        "p0  (cat)",
        "PCK of this pair: alpha 0.05: 1/5 (20%) | alpha 0.1: 3/5 (60%) | alpha 0.15: 4/5 (80%)",
        "markers at alpha 0.1: correct when the error <= 0.1 x 50.0 px (bbox-target, measured "
        "in the original frame)",
    ]
    picture = t.visual(record, batch, pred)
    assert picture.width == 2 * MIN_SIDE + PAD  # both 100 px images enlarged to MIN_SIDE


def test_resized_frame_tolerance_is_drawn_in_target_pixels():
    """Scored in a 64 x 64 stretch of the 100 x 80 target: the tolerance is an ellipse whose
    radii are alpha x size divided by each axis's scale."""
    t = task(frame="resized", image_size=64)
    batch, pred = pair()
    record = t.record(batch, pred)
    size = record["threshold_size"]
    assert size == pytest.approx(max(50 * 0.64, 40 * 0.8))  # the box in the resized frame
    rx, ry = t.outcome(record, batch).tolerance
    assert (rx, ry) == pytest.approx((0.1 * size / 0.64, 0.1 * size / 0.8))
    t.update(record, batch)
    drawn = sum(s is True for s in t.outcome(record, batch).states())
    assert drawn == int(t.metric.correct.sum(0)[t.metric.alphas.index(0.1)]) >= 2


def test_points_without_ground_truth_are_drawn_plain_and_not_counted():
    gt = [*GT[:4], [math.nan, math.nan]]
    t = task()
    batch, pred = pair(gt=gt)
    pred[4] = torch.tensor([80.0, 70.0])
    record = t.record(batch, pred)
    outcome = t.outcome(record, batch)
    assert outcome.states() == [True, True, True, False, None]
    labels = [e.label for e in match_legend(outcome)]
    assert labels[-1] == "prediction without ground truth (1)"
    picture = draw_matches(batch["src_img"], batch["trg_img"], batch["src_kps"], pred, outcome)
    scale = MIN_SIDE / 100
    assert picture.getpixel((round(100 * scale) + PAD + 80 * scale, 70 * scale)) == NEUTRAL


# ------------------------------------------------------------------------------- segmentation

NAMES = ["background", "cat", "dog", "bird"]


def maps():
    """GT: background left half, cat right half, one ignored column; prediction: background,
    cat and a dog block. Bird appears in neither."""
    label = torch.zeros(6, 8, dtype=torch.long)
    label[:, 4:] = 1
    label[:, 3] = 255
    pred = label.clone()
    pred[:, 3] = 0
    pred[:2, 5:] = 2  # 6 cat pixels predicted as dog
    return label, pred


def test_segmentation_legend_lists_the_classes_present_with_their_iou():
    label, pred = maps()
    scores = image_iou(pred, label, NAMES, 255)
    # background: 18 GT px all right -> 18/18; cat: 24 GT px, 18 right, 0 extra -> 18/24;
    # dog: 0 GT px, 6 predicted -> 0/6; bird: nowhere -> None
    assert scores["per_class_iou"] == pytest.approx(
        {"background": 100.0, "cat": 75.0, "dog": 0.0, "bird": None}
    )
    assert scores["miou"] == pytest.approx((100 + 75 + 0) / 3)
    entries = class_legend(scores["per_class_iou"], class_palette(NAMES), ignored=True)
    assert [e.label for e in entries] == [
        "background: IoU 100.0%",
        "cat: IoU 75.0%",
        "dog: IoU 0.0%",
        "ignored (not scored)",
    ]
    picture = draw_segmentation(torch.zeros(3, 6, 8, dtype=torch.uint8), label, pred, NAMES, 255)
    assert picture.width == 3 * MIN_SIDE + 2 * PAD  # three panels enlarged 50x


def test_an_image_with_every_pixel_ignored_has_no_iou():
    label = torch.full((4, 4), 255)
    scores = image_iou(torch.zeros(4, 4, dtype=torch.long), label, NAMES, 255)
    assert scores["miou"] is None and set(scores["per_class_iou"].values()) == {None}
    assert class_legend(scores["per_class_iou"], class_palette(NAMES), ignored=True)[0].label == (
        "ignored (not scored)"
    )


def test_palette_background_black_other_classes_distinct():
    palette = class_palette(NAMES)
    assert palette[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in palette.tolist()}) == len(NAMES)


def test_blend_mixes_the_class_colour_and_leaves_background_untinted():
    image = torch.tensor([[[100, 200]], [[50, 10]], [[0, 255]]], dtype=torch.uint8)  # 1 x 2
    labels = torch.tensor([[0, 2]])
    out = blend(image, labels, NAMES)
    assert out[0, 0].tolist() == [100, 50, 0]  # background: the image itself
    colour = class_palette(NAMES)[2].astype(float)
    expected = np.round((1 - OVERLAY_ALPHA) * np.array([200, 10, 255]) + OVERLAY_ALPHA * colour)
    assert out[0, 1].tolist() == expected.astype(int).tolist()
    labels_legend = [e.label for e in overlay_legend(labels, NAMES)]
    assert labels_legend == ["background (50.0%, untinted)", "dog (50.0%)"]


def test_segment_overlay_is_the_blend_of_the_written_mask(tmp_path, capsys):
    root = write_synthetic_voc(tmp_path / "data", num_images=1, classes=3, image_size=64)
    image = root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "synthetic_000000.jpg"
    classes = SyntheticVOCDataset(root, 3).class_names[1:]
    out, overlay = tmp_path / "mask.png", tmp_path / "overlay.png"
    argv = ["segment", str(image), "--out", str(out), "--overlay", str(overlay)]
    options = [
        f"method.support_folder={root / 'support'}",
        "method.extractors=[colour]",
        "method.mask_proposer=saliency",
        "method.clip_filter=false",
        "method.kmeans_k=4",
        f"method.prototype_cache={tmp_path / 'cache'}",
    ]
    assert main([*argv, "--classes", *classes, *options]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["overlay"] == str(overlay) and "warning" not in summary
    with Image.open(out) as png:
        mask = torch.from_numpy(np.asarray(png).astype(np.int64))
    with Image.open(image) as img:
        pixels = torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1)
    with Image.open(overlay) as png:
        drawn = np.asarray(png.convert("RGB"))
    h, w = mask.shape
    assert drawn.shape[1] >= w and drawn.shape[0] > h  # the legend lies below the image
    names = ["background", *classes]
    assert (drawn[:h, :w] == blend(pixels, mask, names)).all()
    tinted = mask > 0
    assert (
        tinted.any()
        and (drawn[:h, :w][tinted.numpy()] != pixels.permute(1, 2, 0)[tinted].numpy()).any()
    )


# ------------------------------------------------------------------------------ random weights


class _Task:
    def visual(self, record, batch, prediction):
        return Image.new("RGB", (420, 300), (10, 20, 30))


class _Module:
    logger = None
    task = _Task()

    def __init__(self, random_weights=None):
        if random_weights is not None:
            self.random_weights = random_weights


def test_random_weights_decision_reads_the_methods_flag():
    assert uses_random_weights(_Module(True)) is True
    assert uses_random_weights(_Module(False)) is False
    assert uses_random_weights(_Module()) is False  # a module that never set it


@pytest.mark.parametrize("random_weights", [True, False])
def test_visuals_are_stamped_iff_the_weights_are_random(tmp_path, random_weights):
    callback = Visuals(tmp_path, count=1)
    outputs = {"record": {"id": "a:b"}, "prediction": None, "reused": False}
    callback.on_sample(None, _Module(random_weights), outputs, {}, 0)
    with Image.open(tmp_path / "visuals" / "a_b.png") as png:
        saved = png.convert("RGB")
    banner = stamp_height(420) if random_weights else 0
    assert saved.size == (420, 300 + banner)
    assert saved.getpixel((210, banner + 150)) == (10, 20, 30)
    assert (saved.getpixel((8, 8)) == STAMP_RED) is random_weights


@pytest.mark.parametrize("width", [120, 420, 900])
def test_the_stamp_is_whole_and_fits_the_picture(width):
    size, lines = stamp_lines(width)
    assert " ".join(lines) == RANDOM_WEIGHTS_STAMP
    assert all(text_width(line, size) <= width - 2 * PAD for line in lines)
    assert len(lines) > 1 if width == 120 else len(lines) == 1
    stamped = stamp_random_weights(Image.new("RGB", (width, 50)))
    assert stamped.size == (width, 50 + stamp_height(width))
