"""OVDiff end to end on the synthetic VOC-layout dataset: `sdzero eval`, `segment`, `prototypes build`.

Known answer: the synthetic classes differ by colour, so the `colour` extractor with prototypes from
the dataset's support folder (saliency masks) segments the test images almost perfectly.
"""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sdzero.segmentation.prototypes as prototypes_module
from datamodules.synthetic_segmentation import SyntheticVOCDataset, write_synthetic_voc
from sdzero.cli import main
from sdzero.config import compose
from sdzero.metrics.miou import MeanIoU
from sdzero.records import read_records
from sdzero.runs import run_eval

CLASSES = ["ball", "box", "kite"]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_synthetic_voc(tmp_path_factory.mktemp("synthetic"), num_images=6, classes=3)


@pytest.fixture
def count_builds(monkeypatch):
    """How many (class, extractor) prototype sets get built from features."""
    calls = []
    original = prototypes_module.prototypes_from_features

    def counted(*args, **kwargs):
        calls.append((kwargs["class_name"], kwargs["extractor"]))
        return original(*args, **kwargs)

    monkeypatch.setattr(prototypes_module, "prototypes_from_features", counted)
    return calls


def demo(tmp_path, data_root, *overrides):
    return compose(
        "demo_segmentation",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.root={data_root}",
            f"method.prototype_cache={tmp_path / 'cache'}",
            "trainer.enable_progress_bar=false",
            "logger=none",
            *overrides,
        ],
    )


def test_demo_segments_the_synthetic_images_almost_perfectly(tmp_path, data_root, count_builds):
    metrics = run_eval(demo(tmp_path, data_root, "visuals=1"))
    assert metrics["miou"] >= 90.0, metrics  # measured: 99.9 (background 100.0)
    assert metrics["per_class_iou"]["background"] >= 95.0
    assert sorted(count_builds) == [(c, "colour") for c in CLASSES]
    assert "warning" not in metrics  # colour features use no weights: a meaningful number

    run = tmp_path / "run"
    written = json.loads((run / "metrics.json").read_text())
    assert written == metrics
    assert list(written)[:3] == ["task", "dataset", "split_size"]
    assert (written["task"], written["dataset"], written["split_size"]) == (
        "segmentation",
        "synthetic-voc",
        6,
    )
    assert written["num_images"] == 6 and written["seconds_per_image"] > 0
    assert (run / "config.yaml").is_file() and len(list((run / "visuals").glob("*.png"))) == 1

    # metrics.json is recomputable from the records and the mask PNGs alone.
    records = list(read_records(run / "predictions" / "rank0.jsonl"))
    assert [r["index"] for r in records] == list(range(6))
    dataset = SyntheticVOCDataset(data_root, 3)
    metric = MeanIoU(["background", *CLASSES])
    for record in records:
        assert record["mask"] == f"masks/{record['id']}.png"
        with Image.open(run / "predictions" / record["mask"]) as png:
            assert png.mode == "L"
            mask = torch.from_numpy(np.asarray(png).astype(np.int64))
        label = dataset[record["index"]]["label"]
        assert mask.shape == label.shape and int(mask.max()) <= 3
        metric.update(mask, label)
    assert metric.compute()["miou"] == pytest.approx(metrics["miou"])

    # A second run finds every prototype in the cache.
    count_builds.clear()
    again = run_eval(demo(tmp_path, data_root, f"output_dir={tmp_path / 'run2'}"))
    assert count_builds == [] and again["miou"] == pytest.approx(metrics["miou"])


def test_tiny_random_sd_features_run_end_to_end(tmp_path, capsys):
    # One image, two classes, one support image each: every SD pass is a 512² tiny-UNet run on CPU.
    data = ["data.num_images=1", "data.classes=2", "data.num_support=1"]
    cfg = demo(
        tmp_path, tmp_path / "small", *data, "method.extractors=[sd]", "method.window_sizes=[]"
    )
    metrics = run_eval(cfg)
    with capsys.disabled():
        print(f"\n[tiny random SD features] synthetic mIoU = {metrics['miou']:.1f}")
    assert 0.0 <= metrics["miou"] <= 100.0 and metrics["num_images"] == 1
    assert set(metrics["per_class_iou"]) == {"background", "ball", "box"}
    assert "meaningless" in metrics["warning"]


def test_cutler_without_detectron2_fails_before_any_image(tmp_path, data_root):
    if importlib.util.find_spec("detectron2") is not None:
        pytest.skip("detectron2 is installed")
    with pytest.raises(ImportError, match="detectron2 is not installed"):
        run_eval(demo(tmp_path, data_root, "method.mask_proposer=cutler"))
    assert list(read_records(tmp_path / "run" / "predictions" / "rank0.jsonl")) == []


def segment_args(data_root, cache):
    return [
        f"method.support_folder={data_root / 'support'}",
        "method.extractors=[colour]",
        "method.mask_proposer=saliency",
        "method.clip_filter=false",
        "method.kmeans_k=8",
        f"method.prototype_cache={cache}",
    ]


def test_segment_command_writes_the_mask_and_explains_a_pixel(tmp_path, data_root, capsys):
    image = data_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "synthetic_000000.jpg"
    label = SyntheticVOCDataset(data_root, 3)[0]["label"]
    ys, xs = torch.nonzero(label == 1, as_tuple=True)  # a ball pixel in the middle of the ball
    x, y = int(xs.float().mean()), int(ys.float().mean())
    assert label[y, x] == 1
    out, why = tmp_path / "mask.png", tmp_path / "why.png"
    argv = ["segment", str(image), "--out", str(out), "--explain", str(why), "--pixel", f"{x},{y}"]
    assert main([*argv, "--classes", *CLASSES, *segment_args(data_root, tmp_path / "c")]) == 0
    summary = json.loads(capsys.readouterr().out)
    with Image.open(out) as png:
        mask = torch.from_numpy(np.asarray(png).astype(np.int64))
    valid = label != 255
    assert (mask[valid] == label[valid]).float().mean() > 0.97
    assert summary["classes"] == ["background", *CLASSES]
    explanation = summary["explanation"]
    assert explanation["label"] == "ball" and explanation["prototype"]["class"] == "ball"
    assert explanation["prototype"]["support_image"].startswith(str(data_root / "support" / "ball"))
    assert why.stat().st_size > 1000


def test_prototypes_build_command_caches_once(tmp_path, data_root, capsys, count_builds):
    argv = ["prototypes", "build", "--out", str(tmp_path / "protos"), "--classes", "box", "kite"]
    assert main([*argv, *segment_args(data_root, "unused")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["classes"]) == ["box", "kite"]
    assert summary["classes"]["box"]["colour"]["fg"] > 1
    assert len(list((tmp_path / "protos").glob("*.pt"))) == 2
    assert main([*argv, *segment_args(data_root, "unused")]) == 0
    assert sorted(count_builds) == [("box", "colour"), ("kite", "colour")]  # built once


@pytest.mark.parametrize("command", ["segment", "prototypes"])
def test_commands_reject_an_empty_class_list(tmp_path, capsys, command):
    argv = ["segment", str(tmp_path / "x.png")] if command == "segment" else ["prototypes", "build"]
    if command == "prototypes":
        argv += ["--out", str(tmp_path)]
    assert main([*argv, "--classes"]) == 2
    assert "no classes given" in capsys.readouterr().err


def test_segment_with_a_tiny_random_clip_filter_keeps_a_non_empty_subset(tmp_path, data_root):
    from sdzero.segmentation.api import segment_file

    image = data_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / "synthetic_000001.jpg"
    args = segment_args(data_root, tmp_path / "c")
    args += [
        "method.clip_filter=true",
        "method.clip_model=tiny_clip16",
        "method.vit_weights=random",
    ]
    summary = segment_file(image, CLASSES, args)
    assert summary["kept"] and set(summary["kept"]) <= set(CLASSES)
    assert sum(summary["share"].values()) == pytest.approx(1.0, abs=1e-3)
    assert "meaningless" in summary["warning"]
