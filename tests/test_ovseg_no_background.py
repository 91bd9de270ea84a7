"""VOC-20 / Context-59 (no background class): OVDiff gives every pixel its best class.

Known answer: on the synthetic VOC-layout set read as VOC-20 (``data.background=false``), the
``colour`` extractor with prototypes from the support folder labels the object pixels correctly,
and the pixels the VOC-21 ground truth calls background get one of the classes (the label space
has no background to give them).
"""

import pytest
import torch

from datamodules.synthetic_segmentation import (
    SyntheticSegmentationDataModule,
    SyntheticVOCDataset,
    write_synthetic_voc,
)
from sdzero.config import compose
from sdzero.metrics.miou import MeanIoU
from sdzero.segmentation.inference import PrototypeBank, Segmenter
from sdzero.segmentation.module import OVDiffModule
from sdzero.segmentation.prototypes import Prototypes

CLASSES = ["ball", "box", "kite"]
FAST = {"short_side": 64, "window_sizes": (48,), "stride": 32, "kmeans_k": 4}


def colour_module(cache, **settings) -> OVDiffModule:
    return OVDiffModule(
        {"arch": "tiny", "weights": None},
        extractors=("colour",),
        mask_proposer="saliency",
        clip_filter=False,
        prototype_cache=str(cache),
        support_folder="auto",
        **{**FAST, **settings},
    )


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_voc(
        tmp_path_factory.mktemp("voc20"), num_images=4, classes=3, image_size=64
    )


def test_voc20_gets_the_known_answer_and_never_a_background_label(tmp_path, data_root):
    dm = SyntheticSegmentationDataModule(str(data_root), 4, CLASSES, 64, background=False)
    dm.setup("test")
    assert dm.class_names == CLASSES and dm.background_index is None
    module = colour_module(tmp_path)
    segmenter = module.prepare(dm.prompt_names, dm.background_index, dm.stuff, dm.support_root)
    assert segmenter.background_index is None and segmenter.num_classes == 3
    voc21 = SyntheticVOCDataset(data_root, CLASSES)  # the same files with background kept
    metric = MeanIoU(CLASSES)
    background_pixels = 0
    for index in range(len(dm.dataset)):
        sample = dm.dataset[index]
        labels = segmenter(sample["image"], tuple(sample["label"].shape)).labels
        assert labels.min() >= 0 and labels.max() < 3  # only class indices
        raw_background = voc21[index]["label"] == 0
        assert (sample["label"][raw_background] == 255).all()  # reduce_zero_label
        background_pixels += int(raw_background.sum())
        metric.update(labels, sample["label"])
    result = metric.compute()
    assert background_pixels > 1000  # background was there, and got classes
    assert result["miou"] >= 85.0, result  # measured: 95.8
    assert min(result["per_class_iou"].values()) >= 80.0, result


def _protos(name: str, fg: torch.Tensor, bg: torch.Tensor) -> Prototypes:
    n, m = len(fg), len(bg)
    return Prototypes(
        name,
        "colour",
        fg.float(),
        bg.float(),
        torch.zeros(n, dtype=torch.int8),
        torch.zeros(m, dtype=torch.int8),
        torch.full((n,), -1),
        torch.full((m,), -1),
        torch.zeros(n, 1, 1, dtype=torch.bool),
        torch.zeros(m, 1, 1, dtype=torch.bool),
        [],
    )


class Constant:
    """An extractor whose features are one direction everywhere."""

    name, dim = "colour", 3

    def __init__(self, direction):
        self.direction = torch.tensor(direction, dtype=torch.float32)

    def prepare(self, pixels):
        return pixels

    def window_features(self, batch, keys):
        return self.direction.view(1, 3, 1, 1).expand(len(batch), 3, 2, 2).clone()


def test_background_prototypes_take_no_part_without_a_background_class():
    # Every pixel looks exactly like class 1's background prototype and only 0.6 like class 1.
    protos = {
        0: _protos("a", torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])),
        1: _protos("b", torch.tensor([[0.0, 0.6, 0.8]]), torch.tensor([[0.0, 0.0, 1.0]])),
    }
    extractor = Constant([0.0, 0.0, 1.0])
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    kwargs = {"window_sizes": (), "short_side": 8}
    without = Segmenter([extractor], [PrototypeBank.build(protos)], 2, None, **kwargs)
    out = without(image)
    assert (out.labels == 1).all()  # the best class, not the background look-alike
    assert out.scores[1].mean() == pytest.approx(0.8, abs=1e-5)
    shifted = {c + 1: p for c, p in protos.items()}  # the same classes with a background at 0
    with_bg = Segmenter([extractor], [PrototypeBank.build(shifted)], 3, 0, **kwargs)
    assert (with_bg(image).labels == 0).all()


@pytest.mark.parametrize(
    ("experiment", "dataset"), [("voc20_ovdiff", "voc2012-20"), ("context59_ovdiff", "context59")]
)
def test_no_background_experiments(experiment, dataset, tmp_path):
    cfg = compose(experiment, [f"data.root={tmp_path}"])
    assert cfg.data.background is False and cfg.choices.method == "ovdiff"
    from sdzero.config import instantiate

    dm = instantiate(cfg.data, key="data")
    assert dm.background_index is None and "background" not in dm.class_names
    assert dm.dataset_class.names[1] == dataset
