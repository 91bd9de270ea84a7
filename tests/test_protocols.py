"""Scoring protocols (protocol=<name>): composition order, per-benchmark values, and each preset's
PCK against a reference computation written here, on hand-made pairs with ties at alpha * size."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from sdzero.config import ConfigError, compose
from sdzero.runs import build_method
from sdzero.tasks.protocols import AVERAGES, Protocol, get_protocol, protocol_names

KEYS = ("pck_threshold", "pck_frame", "pck_alphas", "pck_inclusive")
SIDE = 512  # ldm_corr's method.image_size: the resized frame is 512 x 512


def scoring(cfg) -> dict:
    return {key: cfg.method[key] for key in KEYS}


def composed(*overrides: str, experiment: str | None = "spair_ldm"):
    return compose(experiment, ["data.root=/nowhere", "backbone=tiny", *overrides])


# ---------------------------------------------------------------------------------- composition


def test_null_keeps_the_experiment_values_and_names_no_protocol():
    cfg = composed()
    assert cfg.protocol is None
    assert scoring(cfg) == {
        "pck_threshold": "bbox-source",
        "pck_frame": "resized",
        "pck_alphas": [0.05, 0.1, 0.15],
        "pck_inclusive": True,
    }


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("hedlin", ("bbox-source", "resized", [0.05, 0.1], True)),
        ("dift", ("bbox-target", "original", [0.1], True)),
        ("geoaware", ("bbox-target", "original", [0.01, 0.05, 0.1], False)),
        ("sd_dino", ("bbox-target", "original", [0.01, 0.05, 0.1], False)),
    ],
)
def test_each_preset_replaces_the_experiment_values(name, expected):
    cfg = composed(f"protocol={name}")
    assert cfg.protocol == name
    assert tuple(scoring(cfg).values()) == expected


@pytest.mark.parametrize(
    ("name", "data", "threshold", "alphas"),
    [
        ("hedlin", "pfwillow", "bbox-keypoints-padded", [0.05, 0.1]),
        ("hedlin", "cub", "bbox-target-xscale", [0.05, 0.1]),
        ("hedlin", "pfpascal", "image", [0.05, 0.1]),
        ("dift", "pfwillow", "bbox-keypoints", [0.1]),
        ("dift", "pfpascal", "image", [0.1]),
        ("geoaware", "pfpascal", "image", [0.05, 0.1, 0.15]),
        ("geoaware", "synthetic_correspondence", "bbox-target", [0.01, 0.05, 0.1]),
    ],
)
def test_benchmarks_without_the_protocols_box_get_what_their_papers_use(
    name, data, threshold, alphas
):
    cfg = composed(f"protocol={name}", f"data={data}")
    assert (cfg.method.pck_threshold, cfg.method.pck_alphas) == (threshold, alphas)


def test_the_command_line_wins_over_the_preset_wherever_it_stands():
    for order in (
        ("method.pck_alphas=[0.2]", "protocol=geoaware"),
        ("protocol=geoaware", "method.pck_alphas=[0.2]"),
    ):
        cfg = composed(*order)
        assert cfg.method.pck_alphas == [0.2] and cfg.method.pck_inclusive is False


def test_an_experiment_may_name_a_protocol_and_the_command_line_may_drop_it(tmp_path):
    exp = tmp_path / "dift_spair.yaml"
    exp.write_text("defaults:\n  - data: spair\nprotocol: dift\nmethod:\n  pck_alphas: [0.3]\n")
    cfg = composed(experiment=str(exp))
    assert cfg.protocol == "dift" and cfg.method.pck_alphas == [0.1]  # the preset wins over it
    dropped = composed("protocol=null", experiment=str(exp))
    assert dropped.protocol is None and dropped.method.pck_alphas == [0.3]


def test_unknown_protocol_and_non_correspondence_method_are_config_errors():
    with pytest.raises(ConfigError, match=r"unknown protocol 'geoawre'.*Did you mean: geoaware"):
        composed("protocol=geoawre")
    with pytest.raises(ConfigError, match=r"protocol=dift: method 'ovdiff' has no PCK scoring"):
        composed("protocol=dift", experiment="voc_ovdiff")


def test_preset_definitions_are_checked_and_every_one_is_registered():
    assert protocol_names() == ["dift", "geoaware", "hedlin", "sd_dino"]
    with pytest.raises(ValueError, match=r"\['steps'\] are not scoring keys"):
        Protocol("x", "", {"steps": 3}, ("pck",))
    with pytest.raises(ValueError, match="averages"):
        Protocol("x", "", {"pck_frame": "original"}, ("pck_image",))
    assert all(set(get_protocol(n).averages) <= set(AVERAGES) for n in protocol_names())


# ------------------------------------------------ each preset's PCK against a reference computation

# Hand-made pairs: (category, src (w, h), trg (w, h), src box, trg box, target points, errors of the
# predictions in ORIGINAL target pixels). Errors sit exactly at alpha * size in the frames the
# presets use: the target box in original pixels (200, 100, 50) and the source box in the 512
# frame (pair a: 50 px wide, source stretched x2 -> 100; errors (6, 4) -> (3, 4) as the target's x
# shrinks by 2; pair b: 25 px x4 -> 100; pair c: unscaled, 40).
PAIRS = [
    ("cat", (256, 256), (1024, 512), [0, 0, 50, 30], [0, 0, 200, 100],
     [[100, 100], [300, 200], [500, 400]], [[6, 4], [12, 8], [0, 7]]),
    ("cat", (128, 128), (128, 128), [10, 10, 35, 30], [0, 0, 100, 50],
     [[10, 10], [20, 20], [30, 30], [40, 40]], [[0, 1], [3, 4], [6, 8], [0, 20]]),
    ("dog", (512, 512), (512, 512), [0, 0, 40, 40], [0, 0, 50, 50],
     [[100, 100], [200, 200], [300, 300]], [[0, 0.5], [1.5, 2], [3, 4]]),
]  # fmt: skip


def batch(index: int) -> dict:
    category, src_size, trg_size, src_box, trg_box, points, _ = PAIRS[index]
    return {
        "index": index,
        "id": f"pair{index}",
        "category": category,
        "src_kps": torch.tensor(points, dtype=torch.float32),  # any points inside the source
        "trg_kps": torch.tensor(points, dtype=torch.float32),
        "src_bbox": torch.tensor(src_box, dtype=torch.float32),
        "trg_bbox": torch.tensor(trg_box, dtype=torch.float32),
        "src_size": src_size,
        "trg_size": trg_size,
    }


def prediction(index: int) -> torch.Tensor:
    *_, points, errors = PAIRS[index]
    return torch.tensor(points, dtype=torch.float64) + torch.tensor(errors, dtype=torch.float64)


def reference(threshold: str, frame: str, alphas: list[float], inclusive: bool) -> dict:
    """PCK in percent from the definitions: per pair then averaged ("pck"), pooled
    ("pck_point"), and both averaged over categories."""

    def scale(size):
        return (SIDE / size[0], SIDE / size[1]) if frame == "resized" else (1.0, 1.0)

    hits: dict[float, list[tuple[str, list[bool]]]] = {a: [] for a in alphas}
    for category, src_size, trg_size, src_box, trg_box, _, errors in PAIRS:
        box, (sx, sy) = (
            (src_box, scale(src_size)) if threshold == "bbox-source" else (trg_box, scale(trg_size))
        )
        size = max((box[2] - box[0]) * sx, (box[3] - box[1]) * sy)
        tx, ty = scale(trg_size)
        distances = [math.hypot(dx * tx, dy * ty) for dx, dy in errors]
        for a in alphas:
            limit = a * size
            hits[a].append((category, [d <= limit if inclusive else d < limit for d in distances]))
    out = {"pck": {}, "pck_point": {}, "pck_category_mean": {}, "pck_point_category_mean": {}}
    for a, pairs in hits.items():
        key = str(a)
        out["pck"][key] = 100 * sum(sum(h) / len(h) for _, h in pairs) / len(pairs)
        out["pck_point"][key] = 100 * sum(sum(h) for _, h in pairs) / sum(len(h) for _, h in pairs)
        cats = sorted({c for c, _ in pairs})
        per_pair = [[sum(h) / len(h) for c, h in pairs if c == cat] for cat in cats]
        pooled = [[x for c, h in pairs if c == cat for x in h] for cat in cats]
        out["pck_category_mean"][key] = 100 * sum(sum(p) / len(p) for p in per_pair) / len(cats)
        out["pck_point_category_mean"][key] = 100 * sum(sum(p) / len(p) for p in pooled) / len(cats)
    return out


def run_task(cfg) -> dict:
    """The records of the three pairs as the run writes them (JSON), scored by a fresh task."""
    categories = SimpleNamespace(category_names=["cat", "dog"])
    writer = build_method(cfg).make_task(categories)
    records = [json.loads(json.dumps(writer.record(batch(i), prediction(i)))) for i in range(3)]
    task = build_method(cfg).make_task(categories)
    task.protocol = cfg.protocol  # what the runner does
    for i, record in enumerate(records):
        task.update(record, batch(i), None, None)
    return task.summary({**task.metric.compute(), "seconds_per_sample": None})


@pytest.mark.parametrize("name", ["hedlin", "dift", "geoaware", "sd_dino"])
def test_each_preset_equals_the_reference_computation(name):
    cfg = composed(f"protocol={name}")
    got = run_task(cfg)
    m = cfg.method
    want = reference(m.pck_threshold, m.pck_frame, list(m.pck_alphas), m.pck_inclusive)
    for key, values in want.items():
        assert got[key] == pytest.approx(values), key
    assert got["protocol"] == name and got["averages"] == list(get_protocol(name).averages)
    assert got["inclusive"] is m.pck_inclusive


def test_hand_computed_answers_with_ties_strict_and_inclusive():
    dift = run_task(composed("protocol=dift"))  # limits 20, 10, 5; the ties count
    assert dift["pck"] == pytest.approx({"0.1": (100 + 75 + 100) / 3})
    assert dift["pck_point"] == pytest.approx({"0.1": 90.0})
    geo = run_task(composed("protocol=geoaware"))  # the same ties do not count
    assert geo["pck"] == pytest.approx(
        {"0.01": 0.0, "0.05": (200 / 3 + 25 + 100 / 3) / 3, "0.1": (100 + 50 + 200 / 3) / 3}
    )
    assert geo["pck_point"] == pytest.approx({"0.01": 0.0, "0.05": 40.0, "0.1": 70.0})
    hedlin = run_task(composed("protocol=hedlin"))  # source box, 512 frame
    assert hedlin["pck"] == pytest.approx(
        {"0.05": (100 / 3 + 25 + 100 / 3) / 3, "0.1": (100 + 25 + 200 / 3) / 3}
    )
    assert hedlin["pck_category_mean"] == pytest.approx(
        {"0.05": ((100 / 3 + 25) / 2 + 100 / 3) / 2, "0.1": ((100 + 25) / 2 + 200 / 3) / 2}
    )
    sd_dino = run_task(composed("protocol=sd_dino"))
    assert sd_dino["pck_point_category_mean"]["0.1"] == pytest.approx((500 / 7 + 200 / 3) / 2)


def test_an_inclusive_override_of_a_strict_preset_counts_the_ties():
    got = run_task(composed("protocol=geoaware", "method.pck_inclusive=true"))
    want = reference("bbox-target", "original", [0.01, 0.05, 0.1], True)
    assert got["pck"] == pytest.approx(want["pck"])
    assert got["pck_point"]["0.01"] == pytest.approx(20.0)  # errors 1 and 0.5 at limits 1, 0.5


def test_without_a_protocol_the_summary_names_none():
    got = run_task(composed())
    assert "protocol" not in got and "averages" not in got
    want = reference("bbox-source", "resized", [0.05, 0.1, 0.15], True)
    assert got["pck"] == pytest.approx(want["pck"])


def test_a_run_names_its_protocol_and_the_records_recompute_it(tmp_path):
    from sdzero.runs import recompute_metrics, run_eval

    out = tmp_path / "run"
    overrides = [f"output_dir={out}", "protocol=dift", "logger=none", "visuals=0"]
    got = run_eval(compose("demo_train", [*overrides, "trainer.enable_progress_bar=false"]))
    assert got["protocol"] == "dift" and list(got["pck"]) == ["0.1"]
    timing_and_weights = {"seconds_per_pair", "warning"}
    assert recompute_metrics(out) == {k: v for k, v in got.items() if k not in timing_and_weights}
