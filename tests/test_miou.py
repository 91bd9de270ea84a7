"""Dataset mIoU against hand-computed confusion matrices, merged ranks, torchmetrics' Jaccard."""

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


IMAGE_C = (torch.tensor([[1, 0, 0, 0]]), torch.tensor([[1, 0, 0, 0]]))


def miou() -> MeanIoU:
    return MeanIoU(["background", "fg"])


def test_state_is_one_confusion_matrix_whatever_the_number_of_images() -> None:
    metric = miou()
    for _ in range(20):
        metric.update(*IMAGE_B)
    assert {k: tuple(v.shape) for k, v in metric.metric_state.items()} == {
        "confmat": (2, 2),
        "num_images": (),
    }
    assert metric.confusion_matrix().tolist() == [[60, 0], [20, 0]]
    assert metric.compute()["num_images"] == 20


def test_two_halves_merged_equal_one_metric_of_everything() -> None:
    whole, first, second = miou(), miou(), miou()
    for pred, target in (IMAGE_A, IMAGE_B, IMAGE_C):
        whole.update(pred, target)
    first.update(*IMAGE_A)
    first.update(*IMAGE_C)
    second.update(*IMAGE_B)
    first.merge_state(second)
    # image C adds 3 true background and 1 true fg pixels to A + B's [[3, 0], [1, 4]]
    assert (
        first.confusion_matrix().tolist() == whole.confusion_matrix().tolist() == [[6, 0], [1, 5]]
    )
    assert first.compute() == whole.compute()
    assert first.compute()["num_images"] == 3


def test_merging_a_metric_without_updates_changes_nothing() -> None:
    metric, idle = miou(), miou()
    metric.update(*IMAGE_A)
    metric.update(*IMAGE_B)
    before = metric.compute()
    metric.merge_state(idle)
    assert metric.compute() == before
    assert before["miou"] == pytest.approx(77.5)


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
    ("pred", "target", "error", "match"),
    [
        ([[0, 2]], [[0, 1]], ValueError, r"pred holds class indices in \[0, 2\]"),
        ([[0, -1]], [[0, 1]], ValueError, "pred holds class indices"),
        ([[0, 1]], [[0, 7]], ValueError, r"target holds labels \[7\]"),
        ([[0.0, 1.0]], [[0, 1]], TypeError, "integer class indices"),
        ([[0, 1]], [[0, 1, 1]], ValueError, "same shape"),
        ([0, 1], [0, 1], ValueError, r"\(H, W\) or \(B, H, W\)"),
    ],
)
def test_bad_input_is_refused(pred, target, error, match) -> None:
    with pytest.raises(error, match=match):
        miou().update(torch.tensor(pred), torch.tensor(target))


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
