"""`sdzero suite`: a 2-benchmark synthetic suite is cut in its second benchmark and resumed; the class
both benchmarks share is built once; suite.json holds the runs' metrics.json; the ovseg8 and
correspondence3 definitions; the table with published numbers beside sdzero's."""

import json

import pytest
import yaml
from PIL import Image

import sdzero.segmentation.prototypes as prototypes_module
from datamodules.synthetic_segmentation import write_synthetic_voc
from sdzero.cli import main
from sdzero.errors import ConfigError
from sdzero.segmentation.module import OVDiffModule
from sdzero.suite import load_suite, plan_suite, split_items, suite_folder
from sdzero.suite_table import format_table, summarise

FAST = [
    "data.num_images=3",
    "data.image_size=64",
    "data.num_support=2",
    "method.short_side=64",
    "method.window_sizes=[48]",
    "method.stride=32",
    "method.kmeans_k=4",
    "logger=none",
    "trainer.enable_progress_bar=false",
    "visuals=0",
]


@pytest.fixture
def suite_file(tmp_path):
    support = write_synthetic_voc(tmp_path / "support", 1, 3, 64, num_support=2) / "support"
    spec = {
        "task": "segmentation",
        "metric": "miou",
        "prototype_cache": "suite",
        "overrides": [*FAST, f"method.support_folder={support}"],
        "benchmarks": {
            "first": {
                "experiment": "demo_segmentation",
                "overrides": ["data.classes=[ball,box]", f"data.root={tmp_path / 'a'}"],
            },
            "second": {
                "experiment": "demo_segmentation",
                "overrides": [
                    "data.classes=[box,kite]",
                    "data.background=false",
                    f"data.root={tmp_path / 'b'}",
                ],
            },
        },
    }
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture
def counters(monkeypatch):
    """Prototype sets built from features, and images predicted; the 5th prediction is cut."""
    built, predicted, state = [], [], {"cut": True}
    original_build = prototypes_module.prototypes_from_features
    original_predict = OVDiffModule.predict

    def build(*args, **kwargs):
        built.append((kwargs["class_name"], kwargs["extractor"]))
        return original_build(*args, **kwargs)

    def predict(self, batch):
        predicted.append((self.trainer.datamodule.dataset_name, int(batch["index"])))
        if len(predicted) == 5 and state["cut"]:
            raise RuntimeError("killed")
        return original_predict(self, batch)

    monkeypatch.setattr(prototypes_module, "prototypes_from_features", build)
    monkeypatch.setattr(OVDiffModule, "predict", predict)
    return built, predicted, state


def test_suite_is_cut_in_its_second_benchmark_and_resumes(tmp_path, suite_file, counters):
    built, predicted, state = counters
    out = tmp_path / "suite"
    with pytest.raises(RuntimeError, match="killed"):
        main(["suite", str(suite_file), f"output_dir={out}"])
    cut = json.loads((out / "suite.json").read_text())
    assert [b["status"] for b in cut["benchmarks"].values()] == ["finished", "interrupted"]
    assert len((out / "second" / "predictions" / "rank0.jsonl").read_text().splitlines()) == 1
    assert sorted(built) == [("ball", "colour"), ("box", "colour"), ("kite", "colour")]

    state["cut"] = False
    predicted.clear()
    assert main(["suite", str(suite_file), f"resume={out}"]) == 0
    # the finished benchmark is skipped, the cut one predicts only its two missing images
    assert predicted == [("synthetic-voc-20", 1), ("synthetic-voc-20", 2)]
    assert len(built) == 3  # box, shared by both, was built once; nothing on resume

    summary = json.loads((out / "suite.json").read_text())
    for name in ("first", "second"):
        entry = summary["benchmarks"][name]
        assert entry["status"] == "finished"
        assert entry["metrics"] == json.loads((out / name / "metrics.json").read_text())
    first, second = (summary["benchmarks"][n]["metrics"] for n in ("first", "second"))
    assert (first["dataset"], second["dataset"]) == ("synthetic-voc", "synthetic-voc-20")
    assert second["num_images"] == 3 and second["miou"] >= 80.0  # colour known answer
    assert set(second["per_class_iou"]) == {"box", "kite"}  # no background on the VOC-20 reading
    counts = {n: b["prototype_sets"] for n, b in summary["benchmarks"].items()}
    assert counts["first"] == {"built": 2, "needed": 2, "from_cache": 0}
    assert counts["second"] == {"built": 1, "needed": 2, "from_cache": 1}  # box from the cache
    assert summary["prototype_sets"] == {
        "needed": 4,
        "distinct": 3,
        "distinct_names": 3,
        "built": 3,
        "from_cache": 1,
    }
    assert len(list((out / "prototypes").glob("*.pt"))) == 3  # one shared cache
    table = (out / "suite.md").read_text()
    assert f"| second | synthetic-voc-20 | finished | 3 | {second['miou']:.1f} |" in table
    with Image.open(out / "suite.png") as png:
        assert png.format == "PNG" and png.size[1] > 50
    with pytest.raises(ConfigError, match="already holds a suite; continue it with resume="):
        plan_suite(load_suite(str(suite_file)), [f"output_dir={out}"])


def test_items_route_to_the_suite_every_benchmark_or_one(suite_file):
    suite = load_suite(str(suite_file))
    keys, common, own = split_items(
        suite, ["output_dir=/o", "seed=3", "first.data.limit=2", "only=[second]"]
    )
    assert keys == {"output_dir": "/o", "only": "[second]"} and common == ["seed=3"]
    assert own == {"first": ["data.limit=2"], "second": []}
    with pytest.raises(ConfigError, match="benchmark 'second': .*method.background must be one"):
        plan_suite(suite, [f"output_dir={suite_file.parent / 's'}", "second.method.background=bg"])


def test_ovseg8_plans_eight_benchmarks_sharing_class_names(tmp_path):
    suite = load_suite("ovseg8")
    items = [f"data.root={tmp_path}", f"output_dir={tmp_path / 's'}"]
    with pytest.raises(ConfigError, match="suite ovseg8, benchmark 'voc21': voc2012: no folder"):
        plan_suite(suite, items)  # the datasets are checked before anything runs
    folder, plans = plan_suite(suite, items, check_data=False)
    assert [p.cfg.experiment for p in plans] == [b.experiment for b in suite.benchmarks]
    assert {p.status for p in plans} == {"fresh"} and len({p.cache for p in plans}) == 1
    names = {p.benchmark.name: {n for n, _ in p.sets} for p in plans}
    assert [len(names[b]) for b in ("voc21", "context60", "coco_object", "voc20")] == [
        20,
        59,
        80,
        20,
    ]
    assert [len(names[b]) for b in ("context59", "coco_stuff", "cityscapes", "ade20k")] == [
        59,
        171,
        19,
        150,
    ]
    assert names["voc20"] == names["voc21"] and names["context59"] == names["context60"]
    assert names["coco_object"] < names["coco_stuff"]
    assert len(set().union(*names.values())) == 272  # distinct prompt names over the eight
    assert {"person", "car", "bus"} <= names["voc21"] & names["coco_object"]
    assert all(e == ("sd", "dino", "clip") for p in plans for e in [tuple(p.cfg.method.extractors)])
    assert [b.name for b in load_suite("correspondence3").benchmarks] == [
        "spair",
        "pfwillow",
        "cub",
    ]


def test_the_table_puts_published_numbers_beside_the_run(tmp_path):
    run = tmp_path / "voc21"
    run.mkdir()
    metrics = {"task": "segmentation", "dataset": "voc2012", "split_size": 1449, "num_images": 1449}
    metrics |= {"miou": 61.25, "per_class_iou": {}, "seconds_per_image": 2.0}
    (run / "metrics.json").write_text(json.dumps(metrics))
    suite = load_suite("ovseg8")
    entries = {
        "voc21": {
            "run_dir": "voc21",
            "status": "finished",
            "metrics": metrics,
            "prototype_sets": {"built": 20, "needed": 60},
        }
    }
    table = format_table(summarise(tmp_path, suite, entries, []))
    header, _, row = table.splitlines()[:3]
    cells = dict(zip(header.split(" | "), row.split(" | "), strict=True))
    assert cells["sdzero miou"] == "61.2" and cells["samples"] == "1449"
    assert cells["OVDiff (SD+DINO+CLIP)"] == "67.1"
    assert (cells["SCLIP"], cells["NACLIP"]) == ("59.6", "64.1")


def test_other_ranks_share_rank_0s_suite_folder(tmp_path, monkeypatch):
    suite = load_suite("ovseg8")
    monkeypatch.setenv("SDZERO_RUN_DIR", str(tmp_path / "suite" / "context60"))
    assert suite_folder(suite, {}) == tmp_path / "suite"  # started by rank 0 in a benchmark
    monkeypatch.delenv("SDZERO_RUN_DIR")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="set output_dir=... .or resume=...."):
        suite_folder(suite, {})  # torchrun: every rank must name the same folder
    assert suite_folder(suite, {"output_dir": str(tmp_path / "s")}) == tmp_path / "s"
