"""OVDiff's CLIP pre-filter and stuff/background filter on constructed similarities."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_seg_inference import make_prototypes

from sdzero.segmentation.filters import (
    ClipFilter,
    best_subset,
    clip_candidates,
    clip_input,
    keep_background,
    subset_prompt,
    subsets,
)
from sdzero.segmentation.inference import PrototypeBank


def test_candidates_keep_probabilities_at_least_one_over_c_in_index_order():
    # softmax >= 1/C  <=>  s >= log(mean(exp(s))) = log((2 e^.3 + 3 e^.1) / 5) = 0.1849
    sims = torch.tensor([0.1, 0.3, 0.1, 0.3, 0.1])
    assert math.log((2 * math.exp(0.3) + 3 * math.exp(0.1)) / 5) == pytest.approx(0.1849, abs=1e-4)
    assert clip_candidates(sims) == [1, 3]
    # log(mean(exp(s))) = 0.1727 here: 0.18 passes, 0.17 does not
    assert clip_candidates(torch.tensor([0.18, 0.17, 0.1, 0.3, 0.1])) == [0, 3]


def test_more_than_topk_candidates_keep_the_most_probable_in_decreasing_order():
    sims = torch.cat([torch.linspace(0.30, 0.41, 12), torch.zeros(3)])  # 12 above 1/C
    assert clip_candidates(sims, topk=10) == list(range(11, 1, -1))
    assert clip_candidates(sims, topk=3) == [11, 10, 9]


def test_subsets_follow_the_official_powerset_order_and_prompts():
    assert subsets([2, 0, 5]) == [(2,), (0,), (5,), (2, 0), (2, 5), (0, 5), (2, 0, 5)]
    assert len(subsets(list(range(10)))) == 1023
    assert subset_prompt(["cat", "dog", "potted plant"], (0, 2)) == "a cat and a potted plant"
    emb = torch.eye(3)
    assert best_subset(torch.tensor([0.0, 1.0, 0.0]), emb, [(0,), (1,), (0, 1)]) == (1,)


class FakeClip:
    """Text embeddings looked up by prompt; one fixed image embedding; counts encoded prompts."""

    def __init__(self, table, image):
        self.table = {k: F.normalize(torch.tensor(v), dim=0) for k, v in table.items()}
        self.image = F.normalize(torch.tensor(image), dim=0)
        self.encoded = []
        self.image_sizes = []

    def encode_text(self, prompts):
        self.encoded += prompts
        return torch.stack([self.table.get(p, torch.tensor([0.0, 0.0, 0.0, 1.0])) for p in prompts])

    def encode_image(self, images):
        self.image_sizes.append(tuple(images.shape))
        return self.image[None]


def test_clip_filter_keeps_the_best_subset_and_always_the_stuff_classes():
    table = {
        "a cat": [1.0, 0.0, 0.0, 0.0],
        "a dog": [0.0, 1.0, 0.0, 0.0],
        "a car": [0.0, 0.0, 1.0, 0.0],
        "a cat and a dog": [1.0, 1.0, 0.0, 0.0],
    }
    clip = FakeClip(table, [1.0, 1.0, 0.0, 0.0])
    # label indices 3, 5, 7 are filterable; 2 (sky) is stuff
    f = ClipFilter(clip, {3: "cat", 5: "dog", 7: "car"}, always=[2])
    image = torch.zeros(3, 448, 600, dtype=torch.uint8)
    assert f(image) == [2, 3, 5]
    assert clip.image_sizes == [(1, 3, 512, 512)]
    # The cat-and-dog subset loses once the image only shows a cat.
    clip.image = F.normalize(torch.tensor([1.0, 0.2, 0.0, 0.0]), dim=0)
    assert f(image) == [2, 3]
    # Prompts are encoded once across images.
    assert sorted(clip.encoded) == sorted(set(clip.encoded))


def test_clip_input_is_the_512_square_in_unit_range():
    image = torch.full((3, 448, 600), 255, dtype=torch.uint8)
    x = clip_input(image)
    assert x.shape == (1, 3, 512, 512) and torch.allclose(x, torch.ones_like(x))


def test_clip_filter_needs_classes():
    with pytest.raises(ValueError, match="at least one filterable class"):
        ClipFilter(FakeClip({}, [1.0, 0, 0, 0]), {})


# ------------------------------------------------------------------------------ stuff filter


def test_background_prototypes_similar_to_stuff_foreground_are_dropped():
    stuff_fg = torch.tensor([[2.0, 0.0, 0.0]])
    bg = torch.tensor(
        [[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.9, math.sqrt(1 - 0.81), 0.0], [0, 0, 1.0]]
    )
    # cosines 1.0, 0.8, 0.9, 0.0 against the threshold 0.85
    assert keep_background(bg, stuff_fg, 0.85).tolist() == [False, True, False, True]
    assert keep_background(bg[:1], stuff_fg, 0.85).tolist() == [True]  # official: <= 1 row kept
    assert keep_background(bg, torch.empty(0, 3), 0.85).all()


def test_bank_drops_stuff_classes_own_background_and_filters_the_others():
    protos = {
        1: make_prototypes("sky", [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        2: make_prototypes("cat", [[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 0.1, 0.0], [0, 1, 1]]),
        3: make_prototypes("dog", [[0.0, 0.0, 1.0]], [[0.99, 0.0, 0.1], [0.0, -1.0, 0.0]]),
    }
    bank = PrototypeBank.build(protos, stuff={1}, stuff_threshold=0.85)
    assert bank.bg_counts.tolist() == [0, 2, 1]
    assert bank.bg_source.tolist() == [0, 2, 1]  # cat's rows 0 and 2, dog's row 1
    # Without stuff classes (VOC) nothing is dropped; threshold 0 switches the filter off.
    assert PrototypeBank.build(protos).bg_counts.tolist() == [2, 3, 2]
    assert PrototypeBank.build(protos, {1}, 0.0).bg_counts.tolist() == [0, 3, 2]
