"""PCK against hand-computed cases: threshold kinds, ties, averaging, categories, merged ranks."""

from __future__ import annotations

import threading

import pytest
import torch

from sdzero.metrics import PCK, THRESHOLD_KINDS, threshold_size

# Target keypoints (x, y) and prediction offsets of length 3, 5 and 10 (exact in float64).
TARGET = [[10.0, 20.0], [50.0, 30.0], [30.0, 80.0]]
OFFSETS = [[0.0, 3.0], [3.0, 4.0], [6.0, -8.0]]
PRED = [[x + dx, y + dy] for (x, y), (dx, dy) in zip(TARGET, OFFSETS, strict=True)]
SRC_BBOX = [0.0, 0.0, 30.0, 40.0]  # longer side 40
TRG_BBOX = [10.0, 20.0, 110.0, 70.0]  # longer side 100
TRG_SIZE = (640, 480)  # (w, h)
THIRD = 100.0 / 3


def flat(result: dict, prefix: str = "") -> dict:
    """Nested result dict as one level, ``{"per_category/cat/0.1": ...}``, for ``pytest.approx``."""
    out = {}
    for key, value in result.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}/")
        else:
            out[prefix + key] = value
    return out


CATEGORIES = ("bird", "cat", "dog")


def score(metric: PCK, pred, target, category: str = "cat", **kwargs) -> None:
    metric.update(pred, target, category=category, **kwargs)


@pytest.mark.parametrize(
    ("kind", "size"),
    [
        ("bbox-target", 100.0),
        ("bbox-source", 40.0),
        ("bbox-keypoints", 60.0),  # x 10..50 -> 40, y 20..80 -> 60
        ("bbox-keypoints-padded", 81.0),  # min clamped to -1: max(50 + 1, 80 + 1)
        ("image", 640.0),
    ],
)
def test_threshold_size_by_kind(kind: str, size: float) -> None:
    got = threshold_size(
        kind, trg_kps=TARGET, src_bbox=SRC_BBOX, trg_bbox=TRG_BBOX, trg_size=TRG_SIZE
    )
    assert got == size


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        # limits alpha * size for alphas 0.05, 0.1, 0.15 against errors 3, 5, 10
        ("bbox-target", [2 * THIRD, 100.0, 100.0]),  # 5, 10, 15
        ("bbox-source", [0.0, THIRD, 2 * THIRD]),  # 2, 4, 6
        ("bbox-keypoints", [THIRD, 2 * THIRD, 2 * THIRD]),  # 3 (a tie), 6, 9
        ("bbox-keypoints-padded", [THIRD, 2 * THIRD, 100.0]),  # 4.05, 8.1, 12.15
        ("image", [100.0, 100.0, 100.0]),  # 32, 64, 96
    ],
)
def test_pck_every_threshold_kind_several_alphas(kind: str, expected: list[float]) -> None:
    metric = PCK(CATEGORIES, threshold=kind)
    score(metric, PRED, TARGET, src_bbox=SRC_BBOX, trg_bbox=TRG_BBOX, trg_size=TRG_SIZE)
    result = metric.compute()
    assert list(result["pck"]) == ["0.05", "0.1", "0.15"]
    assert list(result["pck"].values()) == pytest.approx(expected)
    assert result["num_pairs"] == 1 and result["num_points"] == 3


def test_all_kinds_are_tested() -> None:
    assert set(THRESHOLD_KINDS) == {
        "bbox-target",
        "bbox-source",
        "bbox-keypoints",
        "bbox-keypoints-padded",
        "image",
    }


@pytest.mark.parametrize(("inclusive", "expected"), [(True, [50.0, 100.0]), (False, [0.0, 50.0])])
def test_ties_at_the_threshold(inclusive: bool, expected: list[float]) -> None:
    # errors exactly 5 and 10 against limits 0.05 * 100 = 5 and 0.1 * 100 = 10
    metric = PCK(CATEGORIES, alphas=(0.05, 0.1), inclusive=inclusive)
    score(metric, [[3.0, 4.0], [6.0, 8.0]], [[0.0, 0.0], [0.0, 0.0]], threshold_size=100.0)
    assert list(metric.compute()["pck"].values()) == pytest.approx(expected)


def test_given_threshold_size_equals_the_computed_one() -> None:
    by_kind, given = (
        PCK(CATEGORIES, threshold="bbox-source"),
        PCK(CATEGORIES, threshold="bbox-source"),
    )
    score(by_kind, PRED, TARGET, src_bbox=SRC_BBOX)
    score(given, PRED, TARGET, threshold_size=40.0)
    assert by_kind.compute() == given.compute()


OK, BAD, ORIGIN = [0.0, 0.0], [20.0, 0.0], [0.0, 0.0]  # errors 0 and 20 against a limit of 10
THREE_PAIRS = [  # cat 1/1 correct, cat 0/3, dog 1/4 (alpha 0.1 of size 100)
    {"pred": [OK], "target": [ORIGIN], "category": "cat"},
    {"pred": [BAD] * 3, "target": [ORIGIN] * 3, "category": "cat"},
    {"pred": [OK] + [BAD] * 3, "target": [ORIGIN] * 4, "category": "dog"},
]


def three_pairs(metric: PCK, order: tuple[int, ...] = (0, 1, 2)) -> None:
    for i in order:
        pair = THREE_PAIRS[i]
        score(metric, pair["pred"], pair["target"], pair["category"], threshold_size=100.0)


def pck(**kwargs) -> PCK:
    return PCK(CATEGORIES, alphas=(0.1,), **kwargs)


EXPECTED_THREE = {
    "pck": {"0.1": (100.0 + 0.0 + 25.0) / 3},
    "pck_point": {"0.1": 100.0 * 2 / 8},
    "per_category": {"cat": {"0.1": 50.0}, "dog": {"0.1": 25.0}},
    "num_pairs": 3,
    "num_points": 8,
    "num_empty_pairs": 0,
}


def test_per_pair_pooled_and_per_category_means() -> None:
    metric = pck()
    three_pairs(metric)
    result = metric.compute()
    assert flat(result) == pytest.approx(flat(EXPECTED_THREE))
    assert list(result["per_category"]) == ["cat", "dog"]  # bird has no pair


def test_order_of_the_pairs_changes_nothing() -> None:
    forward, backward = pck(), pck()
    three_pairs(forward)
    three_pairs(backward, order=(2, 1, 0))
    assert flat(forward.compute()) == pytest.approx(flat(backward.compute()))


def test_per_category_keys_are_sorted_by_name_whatever_the_construction_order() -> None:
    metric = PCK(("dog", "cat"), alphas=(0.1,))
    three_pairs(metric, order=(2, 0))
    assert list(metric.compute()["per_category"]) == ["cat", "dog"]


def test_state_does_not_grow_with_the_pairs() -> None:
    metric = PCK(CATEGORIES)  # 3 categories, 3 alphas
    shapes = {name: tuple(value.shape) for name, value in metric.metric_state.items()}
    assert shapes == {
        "num_pairs": (3,),
        "percent_sum": (3, 3),
        "correct": (3, 3),
        "num_points": (3,),
        "num_empty_pairs": (),
        "num_unlabelled": (),
    }
    for _ in range(50):
        score(metric, PRED, TARGET, trg_bbox=TRG_BBOX)
    assert {name: tuple(v.shape) for name, v in metric.metric_state.items()} == shapes
    assert metric.compute()["num_pairs"] == 50


def test_pair_without_keypoints_is_left_out() -> None:
    metric = pck()
    three_pairs(metric)
    score(metric, [], [], "bird")  # no threshold input needed for an empty pair
    result = metric.compute()
    assert result["pck"] == pytest.approx(EXPECTED_THREE["pck"])
    assert "bird" not in result["per_category"]
    assert (result["num_pairs"], result["num_empty_pairs"]) == (3, 1)


def test_unknown_category_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown category 'cow'.*\['bird', 'cat', 'dog'\]"):
        score(pck(), [OK], [ORIGIN], "cow", threshold_size=100.0)


def test_module_dtype_casts_keep_the_sums_exact() -> None:
    # Lightning's bf16-true calls module.to(torch.bfloat16); 100/3 has no exact bfloat16
    metric = pck()
    metric.to(torch.bfloat16)
    three_pairs(metric)
    assert metric.percent_sum.dtype == torch.float64
    assert flat(metric.compute()) == pytest.approx(flat(EXPECTED_THREE), rel=1e-12)


def test_two_halves_merged_equal_one_metric_of_everything() -> None:
    whole, first, second = pck(), pck(), pck()
    three_pairs(whole)
    three_pairs(first, order=(0, 2))
    three_pairs(second, order=(1,))
    first.merge_state(second)
    assert flat(first.compute()) == pytest.approx(flat(whole.compute()))
    assert flat(first.compute()) == pytest.approx(flat(EXPECTED_THREE))


def test_merging_a_metric_without_updates_changes_nothing() -> None:
    metric, idle = pck(), pck()
    three_pairs(metric)
    before = metric.compute()
    metric.merge_state(idle)
    assert metric.compute() == before


class FakeWorld:
    """All-gather between threads, one per rank, with the constraints of a real ``all_gather``."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=10)
        self.slots: list[torch.Tensor | None] = [None] * world_size
        self.local = threading.local()

    def all_gather(self, tensor: torch.Tensor, group: object = None) -> list[torch.Tensor]:
        self.slots[self.local.rank] = tensor
        self.barrier.wait()
        gathered = [t.clone() for t in self.slots]
        self.barrier.wait()
        if len({(t.dtype, t.ndim) for t in gathered}) != 1:
            raise RuntimeError(f"all_gather of mismatched tensors: {gathered}")
        return gathered


def compute_on_ranks(metrics: list[PCK]) -> list[dict]:
    """``compute()`` on each metric as one rank of a world, synced by torchmetrics' own code."""
    world, results, errors = FakeWorld(len(metrics)), [None] * len(metrics), []

    def run(rank: int) -> None:
        world.local.rank = rank
        metrics[rank].dist_sync_fn = world.all_gather
        metrics[rank].distributed_available_fn = lambda: True
        try:
            results[rank] = metrics[rank].compute()
        except Exception as err:  # re-raised in the main thread below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(len(metrics))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_two_ranks_give_the_one_rank_result() -> None:
    ranks = [pck(), pck()]
    three_pairs(ranks[0], order=(0, 2))
    three_pairs(ranks[1], order=(1,))
    for result in compute_on_ranks(ranks):
        assert flat(result) == pytest.approx(flat(EXPECTED_THREE))


def test_a_rank_without_samples_still_syncs() -> None:
    ranks = [pck(), pck()]
    three_pairs(ranks[0])
    for result in compute_on_ranks(ranks):
        assert flat(result) == pytest.approx(flat(EXPECTED_THREE))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pred": [[0.0, 0.0]], "target": [[0.0, 0.0], [1.0, 1.0]]}, ValueError, "same shape"),
        ({"pred": [0.0, 0.0], "target": [0.0, 0.0]}, ValueError, r"\(N, 2\)"),
        ({"pred": [[float("nan"), 0.0]]}, ValueError, "NaN"),
        ({"trg_bbox": None}, ValueError, "needs trg_bbox"),
        ({"trg_bbox": [10.0, 0.0, 0.0, 5.0]}, ValueError, "x2 >= x1"),
        ({"trg_bbox": [0.0, 0.0, 5.0]}, ValueError, r"\[x1, y1, x2, y2\]"),
        ({"threshold_size": 0.0}, ValueError, "positive"),
        ({"category": ["cat"]}, ValueError, "unknown category"),
        ({"category": "cow"}, ValueError, "unknown category 'cow'"),
    ],
)
def test_bad_input_is_refused(kwargs: dict, error: type, match: str) -> None:
    args = {
        "pred": [[0.0, 0.0]],
        "target": [[0.0, 0.0]],
        "category": "cat",
        "trg_bbox": TRG_BBOX,
    } | kwargs
    with pytest.raises(error, match=match):
        PCK(CATEGORIES).update(args.pop("pred"), args.pop("target"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alphas": ()}, "distinct positive"),
        ({"alphas": (0.1, 0.1)}, "distinct positive"),
        ({"alphas": (0.0,)}, "distinct positive"),
        ({"threshold": "bbox"}, "unknown PCK threshold 'bbox'"),
        ({"categories": ()}, "at least one"),
        ({"categories": ("cat", "")}, "non-empty strings"),
        ({"categories": ("cat", "cat")}, "distinct"),
        ({"categories": "cat"}, "the string 'cat'"),
    ],
)
def test_bad_construction_is_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PCK(**({"categories": CATEGORIES} | kwargs))


def test_compute_without_pairs_is_refused() -> None:
    with pytest.raises(RuntimeError, match="before any update"):
        PCK(CATEGORIES).compute()
