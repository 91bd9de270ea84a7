"""method.background: background prototypes on VOC-21 / Context-60 / COCO-Object, none on the other
five benchmarks (``auto``), either one on request; ``prototypes`` without a background class is a
config error before any prototype is built."""

import pytest
from test_ovseg_no_background import colour_module

import sdzero.segmentation.prototypes as prototypes_module
from datamodules.synthetic_segmentation import SyntheticVOCDataset, write_synthetic_voc
from sdzero.config import compose, instantiate
from sdzero.errors import ConfigError
from sdzero.metrics.miou import MeanIoU

NAMES = ["background", "ball", "box", "kite"]
RULES = {  # experiment -> the background rule auto resolves to
    "voc_ovdiff": True,
    "context_ovdiff": True,
    "coco_object_ovdiff": True,
    "voc20_ovdiff": False,
    "context59_ovdiff": False,
    "coco_stuff_ovdiff": False,
    "cityscapes_ovdiff": False,
    "ade20k_ovdiff": False,
}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bgrule")
    return write_synthetic_voc(root, num_images=3, classes=3, image_size=64)


def miou(segmenter, data_root):
    dataset = SyntheticVOCDataset(data_root, 3)
    metric, predicted = MeanIoU(NAMES), set()
    for index in range(len(dataset)):
        sample = dataset[index]
        labels = segmenter(sample["image"], tuple(sample["label"].shape)).labels
        predicted |= set(labels.unique().tolist())
        metric.update(labels, sample["label"])
    return metric.compute()["per_class_iou"], predicted


@pytest.mark.parametrize("rule", ["auto", "prototypes", "none"])
def test_the_rule_on_a_benchmark_with_background(tmp_path, data_root, rule):
    module = colour_module(tmp_path, background=rule)
    segmenter = module.prepare(NAMES, 0, {0}, data_root / "support")
    assert segmenter.background_prototypes is (rule != "none")
    per_class, predicted = miou(segmenter, data_root)
    if rule == "none":
        assert 0 not in predicted and per_class["background"] == 0.0
        assert min(per_class[c] for c in NAMES[1:]) < 60.0  # background pixels went to classes
    else:
        assert 0 in predicted and per_class["background"] >= 90.0  # measured 99.6
        assert min(per_class[c] for c in NAMES[1:]) >= 80.0


def test_prototypes_without_a_background_class_fails_before_building(
    tmp_path, data_root, monkeypatch
):
    builds = []
    monkeypatch.setattr(prototypes_module, "prototypes_from_features", builds.append)
    module = colour_module(tmp_path, background="prototypes")
    with pytest.raises(ConfigError, match="method.background=prototypes needs a benchmark"):
        module.prepare(NAMES[1:], None, set(), data_root / "support")
    assert builds == []
    assert colour_module(tmp_path, background="none").background_prototypes(None) is False


def test_a_wrong_rule_is_named():
    with pytest.raises(ConfigError, match="method.background must be one of"):
        compose("demo_segmentation", ["method.background=bg"])


@pytest.mark.parametrize(("experiment", "uses_background"), RULES.items())
def test_each_experiment_states_its_rule(tmp_path, experiment, uses_background):
    cfg = compose(experiment, [f"data.root={tmp_path}"])
    assert cfg.method.background == "auto"
    dm = instantiate(cfg.data, key="data")
    module = colour_module(tmp_path, background=cfg.method.background)
    assert module.background_prototypes(dm.background_index) is uses_background
    assert (dm.background_index == 0) is uses_background
