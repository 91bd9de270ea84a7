"""Dataset mIoU against hand-computed confusion matrices; dedupe; torchmetrics' Jaccard as reference."""

from __future__ import annotations

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from sdzero.metrics import MeanIoU

NAMES = ["background", "cat", "dog", "cow", "bird"]
# cow (3) is predicted but absent from the ground truth; bird (4) is absent from both.
TARGET = torch.tensor([[0, 0, 1], [1, 1, 255], [2, 2, 2]])
PRED = torch.tensor([[0, 1, 1], [1, 3, 0], [2, 2, 0]])
MATRIX = [  # rows: ground truth, columns: prediction; the 255 pixel (predicted 0) is dropped
    [1, 1, 0, 0, 0],
    [0, 2, 0, 1, 0],
    [1, 0, 2, 0, 0],
    [0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0],
]
# IoU = TP / (row + column - TP): background 1/3, cat 2/4, dog 2/3, cow 0/1, bird undefined
PER_CLASS = {"background": 100 / 3, "cat": 50.0, "dog": 200 / 3, "cow": 0.0, "bird": None}
MIOU = (100 / 3 + 50.0 + 200 / 3 + 0.0) / 4


def test_hand_computed_confusion_matrix_and_iou() -> None:
    metric = MeanIoU(NAMES)
    metric.update(PRED, TARGET)
    assert metric.confusion_matrix().tolist() == MATRIX
    result = metric.compute()
    assert result["miou"] == pytest.approx(MIOU)  # 37.5
    assert result["per_class_iou"]["bird"] is None
    assert {k: v for k, v in result["per_class_iou"].items() if v is not None} == pytest.approx(
        {k: v for k, v in PER_CLASS.items() if v is not None}
    )
    assert result["num_images"] == 1


def test_torchmetrics_macro_jaccard_agrees_but_reports_absent_classes_as_zero() -> None:
    reference = MulticlassJaccardIndex(len(NAMES), ignore_index=255, average="macro")
    assert 100 * float(reference(PRED, TARGET)) == pytest.approx(MIOU)
    per_class = MulticlassJaccardIndex(len(NAMES), ignore_index=255, average=None)
    # where ours says None (absent everywhere), torchmetrics says 0
    assert (100 * per_class(PRED, TARGET)).tolist() == pytest.approx(
        [v if v is not None else 0.0 for v in PER_CLASS.values()]
    )


# Two 1x4 images, classes (background, fg): A is all fg, predicted right; B has one fg pixel missed.
IMAGE_A = (torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 1]]))  # (pred, target)
IMAGE_B = (torch.tensor([[0, 0, 0, 0]]), torch.tensor([[0, 0, 0, 1]]))
# Pooled: background 3 / 4, fg 4 / 5. Per image: A 100 (fg only), B (3/4 + 0/1) / 2 = 37.5.
POOLED = {"background": 75.0, "fg": 80.0}


def test_accumulating_over_images_differs_from_averaging_per_image() -> None:
    pooled = MeanIoU(["background", "fg"])
    per_image = []
    for pred, target in (IMAGE_A, IMAGE_B):
        pooled.update(pred, target)
        single = MeanIoU(["background", "fg"])
        single.update(pred, target)
        per_image.append(single.compute()["miou"])
    result = pooled.compute()
    assert result["per_class_iou"] == pytest.approx(POOLED)
    assert result["miou"] == pytest.approx(77.5)
    assert per_image == pytest.approx([100.0, 37.5])  # their mean, 68.75, is not the benchmark's


def test_a_batch_equals_its_images_one_by_one() -> None:
    batched, single = MeanIoU(["background", "fg"]), MeanIoU(["background", "fg"])
    batched.update(torch.stack([IMAGE_A[0], IMAGE_B[0]]), torch.stack([IMAGE_A[1], IMAGE_B[1]]))
    for pred, target in (IMAGE_A, IMAGE_B):
        single.update(pred, target)
    assert torch.equal(batched.confusion_matrix(), single.confusion_matrix())
    assert batched.compute() == single.compute()


def test_an_image_updated_twice_with_its_index_counts_once() -> None:
    metric = MeanIoU(["background", "fg"])
    metric.update(IMAGE_A[0], IMAGE_A[1], index=0)
    metric.update(IMAGE_B[0], IMAGE_B[1], index=torch.tensor([1]))
    # image 1 again (a padded sampler's repeat) with another prediction: the first update wins
    metric.update(IMAGE_B[1], IMAGE_B[1], index=1)
    assert metric.confusion_matrix().tolist() == [[3, 0], [1, 4]]
    assert metric.compute()["miou"] == pytest.approx(77.5)
    assert metric.compute()["num_images"] == 2


def test_without_an_index_a_repeat_is_counted_again() -> None:
    metric = MeanIoU(["background", "fg"])
    for pred, target in (IMAGE_A, IMAGE_B, IMAGE_B):
        metric.update(pred, target)
    assert metric.confusion_matrix().tolist() == [[6, 0], [2, 4]]
    assert metric.compute()["num_images"] == 3


def test_merged_rank_states_count_a_repeated_image_once() -> None:
    # 2 ranks over 3 images with padding: rank 0 gets images 0, 2; rank 1 gets 1, 0
    images = [IMAGE_A, IMAGE_B, (torch.tensor([[1, 0, 0, 0]]), torch.tensor([[1, 0, 0, 0]]))]
    ranks = [MeanIoU(["background", "fg"]), MeanIoU(["background", "fg"])]
    for metric, order in zip(ranks, ((0, 2), (1, 0)), strict=True):
        for i in order:
            metric.update(*images[i], index=i)
    ranks[0].merge_state(ranks[1])
    # image 2 adds 3 true background and 1 true fg pixels to the pooled [[3, 0], [1, 4]]
    assert ranks[0].confusion_matrix().tolist() == [[6, 0], [1, 5]]
    assert ranks[0].compute()["num_images"] == 3


def test_ignored_pixels_count_for_nothing() -> None:
    with_void, without = MeanIoU(["background", "fg"]), MeanIoU(["background", "fg"])
    # the void pixels are predicted fg; counted they would add false positives
    with_void.update(torch.tensor([[1, 1, 1, 0]]), torch.tensor([[255, 255, 1, 0]]))
    without.update(torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))
    assert (
        with_void.compute()
        == without.compute()
        == {
            "miou": 100.0,
            "per_class_iou": {"background": 100.0, "fg": 100.0},
            "num_images": 1,
        }
    )


@pytest.mark.parametrize(
    ("pred", "target", "kwargs", "error", "match"),
    [
        ([[0, 2]], [[0, 1]], {}, ValueError, r"pred holds class indices in \[0, 2\]"),
        ([[0, -1]], [[0, 1]], {}, ValueError, "pred holds class indices"),
        ([[0, 1]], [[0, 7]], {}, ValueError, r"target holds labels \[7\]"),
        ([[0.0, 1.0]], [[0, 1]], {}, TypeError, "integer class indices"),
        ([[0, 1]], [[0, 1, 1]], {}, ValueError, "same shape"),
        ([0, 1], [0, 1], {}, ValueError, r"\(H, W\) or \(B, H, W\)"),
        ([[0, 1]], [[0, 1]], {"index": [0, 1]}, ValueError, "1 integer"),
        ([[0, 1]], [[0, 1]], {"index": -2}, ValueError, "index must be >= 0"),
    ],
)
def test_bad_input_is_refused(pred, target, kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        MeanIoU(["background", "fg"]).update(torch.tensor(pred), torch.tensor(target), **kwargs)


def test_without_ignore_index_void_labels_are_refused() -> None:
    metric = MeanIoU(["background", "fg"], ignore_index=None)
    with pytest.raises(ValueError, match="ignore_index=None"):
        metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 255]]))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"class_names": []}, "non-empty"),
        ({"class_names": ["a", "a"]}, "distinct"),
        ({"class_names": ["a", "b"], "ignore_index": 1}, "ignore_index=1 is also the class 'b'"),
    ],
)
def test_bad_construction_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MeanIoU(**kwargs)


def test_compute_without_images_is_refused() -> None:
    with pytest.raises(RuntimeError, match="before any update"):
        MeanIoU(["background", "fg"]).compute()
