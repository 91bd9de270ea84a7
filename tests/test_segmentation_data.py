"""What the segmentation datamodules (VOC, Context, COCO-Object/Stuff, synthetic) share: class and
prompt names, the messages of a missing dataset folder, and the configs. Each loader's tests are
in test_voc_context_data.py, test_coco_data.py and test_synthetic_segmentation_data.py."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from datamodules.coco import COCOObjectDataModule, COCOStuffDataModule
from datamodules.context import ContextDataModule
from datamodules.files import DatasetNotFoundError
from datamodules.voc import VOCDataModule

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "data"


# ------------------------------------------------------------------------------------ names


def test_class_name_counts_renames_and_stuff() -> None:
    voc21, voc20 = VOCDataModule("x"), VOCDataModule("x", background=False)
    c60, c59 = ContextDataModule("x"), ContextDataModule("x", background=False)
    obj, stuff = COCOObjectDataModule("x"), COCOStuffDataModule("x")
    counts = [len(dm.class_names) for dm in (voc21, voc20, c60, c59, obj, stuff)]
    assert counts == [21, 20, 60, 59, 81, 171]
    for dm in (voc21, voc20, c60, c59, obj, stuff):
        assert len(dm.prompt_names) == len(dm.class_names) == len(set(dm.prompt_names))

    renames = {"aeroplane": "airplane", "diningtable": "table", "tvmonitor": "monitor"}
    renames["pottedplant"] = "potted plant"
    for old, new in renames.items():
        assert voc21.prompt_names[voc21.class_names.index(old)] == new
    assert voc21.class_names[0] == voc21.prompt_names[0] == "background"
    assert voc21.class_names[20] == "tvmonitor" and voc20.prompt_names[19] == "monitor"

    assert c60.class_names[0] == "background" and c60.class_names[-1] == "wood"
    assert c60.prompt_names[c60.class_names.index("pottedplant")] == "potted plant"
    # The official IS_STUFF (sdov mmdata.py) on the Context-60 names, background included.
    official = [0, 4, 16, 18, 22, 25, 26, 29, 30, 35, 39, 41, 42, 45, 47, 48, 51, 56, 57, 59]
    assert sorted(c60.stuff) == official
    stuff60 = {c60.class_names[i] for i in c60.stuff}
    assert {"bedclothes", "cloth", "sky", "wall", "wood"} <= stuff60
    assert not {"building", "tree", "person", "cat", "aeroplane"} & stuff60
    assert {c59.class_names[i] for i in c59.stuff} == stuff60 - {"background"}
    assert (c60.background_index, c59.background_index) == (0, None)

    assert obj.class_names[:3] == ["background", "person", "bicycle"]
    assert obj.class_names[80] == "toothbrush" and obj.stuff == {0}
    # The official prompt overlay: keyboard -> "computer keyboard" (Context and COCO).
    for dm in (c60, obj):
        assert dm.prompt_names[dm.class_names.index("keyboard")] == "computer keyboard"
    assert stuff.class_names[79:81] == ["toothbrush", "banner"] and stuff.class_names[-1] == "wood"
    assert stuff.stuff == set(range(80, 171)) and stuff.background_index is None
    assert stuff.prompt_names[stuff.class_names.index("sky-other")] == "sky"
    assert stuff.prompt_names[stuff.class_names.index("desk-stuff")] == "desk"
    assert stuff.prompt_names[stuff.class_names.index("wall-brick")] == "wall brick"


# ------------------------------------------------------------------------------------ bad input


def test_missing_dataset_folder_lists_expected_layout(tmp_path: Path) -> None:
    for dm in (VOCDataModule(str(tmp_path / "nope")), VOCDataModule(str(tmp_path))):
        with pytest.raises(DatasetNotFoundError, match=r"(?s)VOC2012.*SegmentationClass/<id>\.png"):
            dm.setup()
    with pytest.raises(DatasetNotFoundError, match=r"(?s)coco_stuff164k.*annotations/val2017"):
        COCOObjectDataModule(str(tmp_path)).setup()
    with pytest.raises(DatasetNotFoundError, match=r"SegmentationClassContext"):
        ContextDataModule(str(tmp_path)).setup()


# -------------------------------------------------------------------------------------- configs

CONFIGS = ["voc", "context", "coco_object", "coco_stuff", "synthetic_segmentation"]


@pytest.mark.parametrize("name", CONFIGS)
def test_data_config_lists_every_constructor_default(name: str) -> None:
    cfg = OmegaConf.load(CONFIG_DIR / f"{name}.yaml")
    module, _, cls_name = cfg._target_.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    params = {n: p.default for n, p in inspect.signature(cls).parameters.items()}
    assert set(cfg) - {"_target_"} == set(params)
    for key, default in params.items():
        if default is inspect.Parameter.empty:
            assert key == "root" and OmegaConf.is_missing(cfg, "root")
        else:
            assert cfg[key] == default, key
