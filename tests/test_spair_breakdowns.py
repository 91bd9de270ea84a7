"""SPair-71k breakdowns: difficulty levels and keypoint ids from the pair JSONs, through the sample
and the record, into PCK by level, per keypoint id, per category pooled and category means."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.files import DatasetFormatError
from datamodules.spair import SPairDataset
from sdzero.metrics.pck_breakdown import DIFFICULTY_LEVELS, PCKBreakdown
from sdzero.tasks.correspondence import CorrespondenceTask, Scoring

ORIGIN, OK, BAD = [0.0, 0.0], [0.0, 0.0], [20.0, 0.0]  # errors 0 and 20 against a limit of 10
# (category, preds, kps_ids, difficulty); one target point per prediction at the origin
PAIRS = [
    ("cat", [OK, BAD], [3, 7], {"viewpoint_variation": 0, "truncation": 3, "occlusion": 1}),
    ("cat", [BAD, BAD, OK], [3, 7, 29], {"viewpoint_variation": 2, "truncation": 3}),
    ("dog", [OK, OK, OK, BAD], [0, 1, 2, 3], {"viewpoint_variation": 0, "scale_variation": 1}),
]


def metric(**kwargs) -> PCKBreakdown:
    return PCKBreakdown(("bird", "cat", "dog"), alphas=(0.1,), **kwargs)


def score(m: PCKBreakdown, order=(0, 1, 2)) -> None:
    for i in order:
        category, preds, ids, difficulty = PAIRS[i]
        m.update(
            preds,
            [ORIGIN] * len(preds),
            category=category,
            threshold_size=100.0,
            kps_ids=ids,
            difficulty=difficulty,
        )


def test_breakdowns_by_hand():
    m = metric()
    score(m)
    got = m.compute()
    assert got["pck"] == pytest.approx({"0.1": (50 + 100 / 3 + 75) / 3})  # base result unchanged
    view = got["by_difficulty"]["viewpoint_variation"]
    assert set(view) == {"0", "2"}  # level 1 has no pair
    assert view["0"]["num_pairs"] == 2 and view["0"]["num_points"] == 6
    assert view["0"]["pck"] == pytest.approx({"0.1": (50 + 75) / 2})
    assert view["0"]["pck_point"] == pytest.approx({"0.1": 100 * 4 / 6})
    assert view["2"]["pck"] == pytest.approx({"0.1": 100 / 3})
    assert got["by_difficulty"]["truncation"] == {
        "3": {"num_pairs": 2, "num_points": 5, "pck": {"0.1": pytest.approx((50 + 100 / 3) / 2)},
              "pck_point": {"0.1": pytest.approx(40.0)}}
    }  # fmt: skip
    assert list(got["by_difficulty"]["occlusion"]) == ["1"]
    assert list(got["by_difficulty"]["scale_variation"]) == ["1"]
    cat = got["per_keypoint"]["cat"]
    assert {k: (v["num_points"], v["pck_point"]["0.1"]) for k, v in cat.items()} == {
        "3": (2, 50.0),
        "7": (2, 0.0),
        "29": (1, 100.0),
    }
    assert got["per_keypoint"]["dog"]["3"]["pck_point"] == {"0.1": 0.0}
    assert "bird" not in got["per_keypoint"] and "bird" not in got["per_category_point"]
    assert got["per_category_point"] == {"cat": {"0.1": 40.0}, "dog": {"0.1": 75.0}}  # exact
    assert got["pck_category_mean"] == pytest.approx({"0.1": ((50 + 100 / 3) / 2 + 75) / 2})
    assert got["pck_point_category_mean"] == pytest.approx({"0.1": (40 + 75) / 2})


def test_pairs_without_levels_or_ids_give_no_breakdown_keys():
    m = metric()
    m.update([OK], [ORIGIN], category="cat", threshold_size=100.0)
    got = m.compute()
    assert "by_difficulty" not in got and "per_keypoint" not in got
    assert got["per_category_point"] == {"cat": {"0.1": 100.0}}


def test_state_is_fixed_and_sums_across_ranks():
    m = metric()
    shapes = {k: tuple(v.shape) for k, v in m.metric_state.items() if k.startswith(("level", "kp"))}
    assert shapes == {
        "level_pairs": (14,),
        "level_fraction": (14, 1),
        "level_correct": (14, 1),
        "level_points": (14,),
        "kp_correct": (3, 30, 1),
        "kp_points": (3, 30),
    }
    assert all(m._reductions[k] is not None for k in shapes)
    whole, first, second, idle = metric(), metric(), metric(), metric()
    score(whole)
    score(first, (0, 2))
    score(second, (1,))
    first.merge_state(second)
    first.merge_state(idle)
    assert json.dumps(first.compute(), sort_keys=True) == json.dumps(
        whole.compute(), sort_keys=True
    )
    assert {k: tuple(v.shape) for k, v in whole.metric_state.items() if k in shapes} == shapes


def test_level_sums_are_integers_whatever_the_order_and_the_module_dtype():
    # float sums of 100/3, 50 and 75 differ in the last digit between orders; integer ones do not
    orders = [(0, 1, 2), (2, 1, 0), (1, 0, 2)]
    results = []
    for order in orders:
        m = metric()
        m.to(torch.bfloat16)
        for i in order:
            category, preds, ids, _ = PAIRS[i]
            m.update(preds, [ORIGIN] * len(preds), category=category, threshold_size=100.0,
                     difficulty={"occlusion": 0})  # fmt: skip
        assert m.level_fraction.dtype == torch.int64
        results.append(m.compute()["by_difficulty"]["occlusion"]["0"]["pck"]["0.1"])
    assert results[0] == results[1] == results[2] == pytest.approx((50 + 100 / 3 + 75) / 3)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"difficulty": {"truncation": 4}}, r"truncation=4: expected an integer 0\.\.3"),
        ({"difficulty": {"viewpoint_variation": 3}}, r"0\.\.2"),
        ({"difficulty": {"pose": 1}}, "unknown difficulty factor 'pose'"),
        ({"kps_ids": [30]}, r"must lie in 0\.\.29"),
        ({"kps_ids": [1, 2]}, "2 ids for 1 keypoints"),
    ],
)
def test_bad_breakdown_inputs_are_refused_before_anything_is_counted(kwargs, match):
    m = metric()
    with pytest.raises(ValueError, match=match):
        m.update([OK], [ORIGIN], category="cat", threshold_size=100.0, **kwargs)
    assert int(m.num_pairs.sum()) == 0


# ------------------------------------------------------------------ loader -> sample -> record


def write_spair(parent: Path, pairs: list[dict]) -> Path:
    """A SPair-71k folder with one 40x30 image per name and the given pair JSON fields."""
    top = parent / "SPair-71k"
    names = []
    for i, fields in enumerate(pairs):
        cat = fields.get("category", "cat")
        src, trg = f"2008_{2 * i:06d}", f"2008_{2 * i + 1:06d}"
        for name in (src, trg):
            path = top / "JPEGImages" / cat / f"{name}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 30)).save(path)
        name = f"{i + 1:06d}-{src}-{trg}:{cat}"
        record = {
            "pair_id": i + 1,
            "category": cat,
            "src_imname": f"{src}.jpg",
            "trg_imname": f"{trg}.jpg",
            "src_bndbox": [0, 0, 20, 20],
            "trg_bndbox": [0, 0, 10, 20],
            "src_kps": [[1, 2], [3, 4]],
            "trg_kps": [[5, 6], [7, 8]],
            **fields,
        }
        folder = top / "PairAnnotation" / "test"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(record))
        names.append(name)
    (top / "Layout" / "large").mkdir(parents=True)
    (top / "Layout" / "large" / "test.txt").write_text("".join(f"{n}\n" for n in names))
    return top


LEVELS = {"viewpoint_variation": 2, "scale_variation": 1, "truncation": 3, "occlusion": 2}


def test_the_loader_carries_ids_mirror_and_levels_into_the_sample(tmp_path):
    write_spair(tmp_path, [{"kps_ids": ["4", "12"], "mirror": 1, **LEVELS}, {}])
    ds = SPairDataset(tmp_path)
    assert ds[0]["extra"] == {"kps_ids": [4, 12], "mirror": 1, **LEVELS}
    assert ds[1]["extra"] == {}  # a JSON without the fields


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"truncation": 4}, r"'truncation' is 4; expected an integer 0\.\.3"),
        ({"occlusion": "2"}, r"'occlusion' is '2'"),
        ({"scale_variation": 3}, r"0\.\.2"),
        ({"mirror": 2}, r"'mirror' is 2; expected an integer 0\.\.1"),
        ({"kps_ids": ["1"]}, r"one id >= 0 per keypoint \(2\)"),
        ({"kps_ids": ["a", "b"]}, "list of keypoint ids"),
    ],
)
def test_bad_breakdown_fields_name_the_file(tmp_path, fields, match):
    write_spair(tmp_path, [fields])
    with pytest.raises(DatasetFormatError, match=rf"PairAnnotation.*{match}"):
        SPairDataset(tmp_path)


def task() -> CorrespondenceTask:
    scoring = Scoring("bbox-target", "original", (0.1,), True, 512, "stretch")
    return CorrespondenceTask(scoring, ["cat", "dog"])


def test_records_keep_the_extras_and_recompute_the_breakdowns(tmp_path):
    write_spair(
        tmp_path,
        [
            {"kps_ids": ["4", "12"], "mirror": 0, **LEVELS},
            {"kps_ids": ["4", "5"], "mirror": 0, **LEVELS, "truncation": 0, "category": "dog"},
        ],
    )
    ds = SPairDataset(tmp_path)
    writer = task()
    preds = [torch.tensor([[5.0, 6.0], [7.0, 18.0]]), torch.tensor([[5.0, 6.0], [7.0, 8.0]])]
    records = [json.loads(json.dumps(writer.record(ds[i], preds[i]))) for i in range(2)]
    assert records[0]["extra"] == {"kps_ids": [4, 12], "mirror": 0, **LEVELS}
    for i, record in enumerate(records):
        writer.update(record, ds[i])
    live = writer.summary({**writer.metric.compute(), "seconds_per_sample": 0.0})
    again = task()
    for i, record in enumerate(records):
        again.update(record, ds[i], None, None)
    summary = again.summary({**again.metric.compute(), "seconds_per_sample": 0.0})
    assert summary == live
    # the target box is 20 px high: limit 2 px; pair 0 misses its second point by 10 px
    assert summary["by_difficulty"]["truncation"] == {
        "0": {"num_pairs": 1, "num_points": 2, "pck": {"0.1": 100.0}, "pck_point": {"0.1": 100.0}},
        "3": {"num_pairs": 1, "num_points": 2, "pck": {"0.1": 50.0}, "pck_point": {"0.1": 50.0}},
    }
    assert summary["per_keypoint"]["cat"] == {
        "4": {"num_points": 1, "pck_point": {"0.1": 100.0}},
        "12": {"num_points": 1, "pck_point": {"0.1": 0.0}},
    }
    assert set(DIFFICULTY_LEVELS) == set(summary["by_difficulty"])
    tables = again.tables(summary)
    assert tables["per_category_point"] == (["name", "0.1"], [["cat", 50.0], ["dog", 100.0]])
    columns, rows = tables["by_difficulty"]
    assert columns[:5] == ["factor", "level", "name", "num_pairs", "num_points"]
    assert ["truncation", 3, "both", 1, 2, 50.0, 50.0] in rows
    assert ["cat", 12, 1, 0.0] in tables["per_keypoint"][1]
    (name, chart), *_ = again.charts({**summary, "dataset": "spair71k"}).items()
    assert name == "pck_breakdown.png" and chart.mode == "RGB"
    # 2 sections of 2 rows for the factors with two levels, ... : taller with more rows
    flat = again.charts({k: v for k, v in summary.items() if k != "by_difficulty"})
    assert flat["pck_breakdown.png"].height < chart.height


def test_records_without_extras_are_unchanged(tmp_path):
    write_spair(tmp_path, [{}])
    ds = SPairDataset(tmp_path)
    record = task().record(ds[0], torch.tensor([[5.0, 6.0], [7.0, 8.0]]))
    assert "extra" not in record
    assert set(record) == {
        "index", "id", "category", "src_kps", "trg_kps", "pred_kps", "src_size", "trg_size",
        "threshold_size",
    }  # fmt: skip
