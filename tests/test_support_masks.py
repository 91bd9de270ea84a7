"""Support sets (DAAM attribution, sampling, caching, folders) and FG/BG mask proposers."""

import functools
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdzero.backbones.sd import load_stable_diffusion
from sdzero.backbones.tokenizer import offline_clip_tokenizer
from sdzero.segmentation import masks, support
from sdzero.segmentation.masks import (
    CutlerInstances,
    build_mask_proposer,
    erode,
    propose_masks,
    rank_instance_masks,
    register_mask_proposer,
    short_side_size,
)
from sdzero.segmentation.support import (
    PROMPT_TEMPLATE,
    AttributionAccumulator,
    FolderSupport,
    GeneratedSupport,
    class_token_positions,
    load_support_folder,
    normalise_attribution,
    sample_support_set,
)

TINY = {"num_support": 2, "steps": 2, "size": 64, "batch_size": 1}


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(None, "tiny", text_encoder=True)


# --- attribution -------------------------------------------------------------------------------


def test_normalise_attribution_known_answer():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])
    # Bilinear 2 -> 4 (half-pixel centres) samples 1-D [a, b] at a, .75a+.25b, .25a+.75b, b.
    axis = torch.tensor([0.0, 0.25, 0.75, 1.0])
    expected = (2 * axis[:, None] + axis[None]) / 3
    out = normalise_attribution(maps, (4, 4))
    assert torch.allclose(out[0], expected, atol=1e-6)
    # Invariant to affine rescaling of the raw map; a constant map gives zeros.
    assert torch.allclose(normalise_attribution(5 * maps + 2, (4, 4)), out, atol=1e-6)
    assert torch.equal(normalise_attribution(torch.ones(1, 2, 2), (3, 3)), torch.zeros(1, 3, 3))


def test_accumulator_uses_conditional_half_class_tokens_and_means():
    acc = AttributionAccumulator(tokens=[2, 3], grid=(8, 8), cfg=True)
    for scale in (1.0, 3.0):  # two captures (layers or steps)
        probs = torch.full((2, 2, 16, 5), 100.0)  # unconditional half must be ignored
        probs[1, 0, :, 2], probs[1, 1, :, 2] = 0.1 * scale, 0.3 * scale  # head mean 0.2 * scale
        probs[1, :, :, 3] = 0.4 * scale
        probs[1, :, :, 4] = -7.0  # not a class token
        acc("layer", "probs", probs)
    # Mean over captures (scale 2), then tokens: (0.2 * 2 + 0.4 * 2) / 2 = 0.6.
    assert torch.allclose(acc.maps(), torch.full((1, 8, 8), 0.6), atol=1e-6)


def test_accumulator_clamps_negative_bicubic_overshoot():
    acc = AttributionAccumulator(tokens=[0], grid=(8, 8), cfg=False)
    probs = torch.zeros(1, 1, 16, 1)
    probs[0, 0, 5, 0] = 1.0  # a single spike: bicubic upsampling rings below zero
    acc("layer", "probs", probs)
    raw = F.interpolate(probs.view(1, 1, 4, 4), size=(8, 8), mode="bicubic", align_corners=False)
    assert raw.min() < 0
    assert torch.equal(acc.maps()[0], raw[0, 0].clamp(min=0))


def test_class_token_positions_multi_token_and_template_words():
    tok = offline_clip_tokenizer()
    # BOS, "a good picture of a" (5 tokens), then the name.
    assert class_token_positions(tok, PROMPT_TEMPLATE, "cat") == [6]
    plant = class_token_positions(tok, PROMPT_TEMPLATE, "potted plant")
    assert plant == [6, 7]
    ids = tok(PROMPT_TEMPLATE.format("potted plant")).input_ids
    assert [ids[i] for i in plant] == tok("potted plant", add_special_tokens=False).input_ids
    assert class_token_positions(tok, PROMPT_TEMPLATE, "a") == [6]  # not the template's "a"
    assert class_token_positions(tok, "{} on a table", "dining table") == [1, 2]
    with pytest.raises(ValueError, match="exactly one"):
        class_token_positions(tok, "no slot", "cat")
    with pytest.raises(ValueError, match="not found"):
        class_token_positions(tok, PROMPT_TEMPLATE, " ".join(["dog"] * 80))


# --- sampling ----------------------------------------------------------------------------------


def test_sample_support_set_shapes_range_and_determinism(sd):
    a = sample_support_set(sd, "potted plant", **TINY)
    assert a.images.shape == (2, 3, 64, 64) and a.attribution.shape == (2, 64, 64)
    assert a.images.min() >= 0 and a.images.max() <= 1
    assert torch.equal(a.images * 255, (a.images * 255).round())  # PNG-exact
    # Min-max normalised per image: each map spans exactly [0, 1].
    assert torch.allclose(a.attribution.amin((1, 2)), torch.zeros(2))
    assert torch.allclose(a.attribution.amax((1, 2)), torch.ones(2))
    b = sample_support_set(sd, "potted plant", **TINY)
    assert torch.equal(a.images, b.images) and torch.equal(a.attribution, b.attribution)
    # Batches continue one generator: image 1 of a batch-2 run is image 1 of the batch-1 run.
    c = sample_support_set(sd, "potted plant", **{**TINY, "batch_size": 2})
    assert torch.allclose(a.images, c.images, atol=2 / 255)
    other = sample_support_set(sd, "potted plant", **{**TINY, "seed": 0, "num_support": 1})
    assert not torch.equal(a.images[:1], other.images)


def test_sample_support_set_rejects_bad_input(sd):
    with pytest.raises(ValueError, match="multiple of 8"):
        sample_support_set(sd, "cat", **{**TINY, "size": 60})
    with pytest.raises(ValueError, match="non-empty string"):
        sample_support_set(sd, " ", **TINY)
    no_text = load_stable_diffusion(None, "tiny")
    with pytest.raises(ValueError, match="text_encoder=True"):
        sample_support_set(no_text, "cat", **TINY)


def test_generated_support_cache_reuses_and_repairs(sd, tmp_path, monkeypatch, caplog):
    calls = []

    @functools.wraps(sample_support_set)
    def counting(*args, **kwargs):
        calls.append(args[1])
        return sample_support_set(*args, **kwargs)

    monkeypatch.setattr(support, "sample_support_set", counting)
    one = {**TINY, "num_support": 1}
    source = GeneratedSupport(sd, tmp_path, **one)
    first = source("cat")
    again = source("cat")
    assert calls == ["cat"]
    assert torch.equal(first.images, again.images)
    assert torch.equal(first.attribution, again.attribution)
    assert again.paths == first.paths and all(p.endswith(".png") for p in again.paths)
    assert source.folder("cat") != GeneratedSupport(sd, tmp_path, **{**one, "seed": 1}).folder(
        "cat"
    )
    (source.folder("cat") / "attribution.pt").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        repaired = source("cat")
    assert calls == ["cat", "cat"] and "resampling" in caplog.text
    assert torch.equal(repaired.attribution, first.attribution)


# --- folders -----------------------------------------------------------------------------------


def _png(path, colour, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, dtype=np.uint8)).save(path)


def test_load_support_folder_resizes_and_sorts(tmp_path):
    _png(tmp_path / "cat" / "b.png", (0, 0, 255), (40, 20))
    _png(tmp_path / "cat" / "a.jpg", (255, 0, 0), (16, 16))
    (tmp_path / "cat" / "notes.txt").write_text("ignored")
    got = load_support_folder(tmp_path, "cat", size=32)
    assert got.images.shape == (2, 3, 32, 32) and got.attribution is None
    assert [p.rsplit("/", 1)[-1] for p in got.paths] == ["a.jpg", "b.png"]
    assert torch.allclose(got.images[1, :, 5, 5], torch.tensor([0.0, 0.0, 1.0]))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "dog")):
        load_support_folder(tmp_path, "dog")


def test_folder_support_key_changes_when_files_change(tmp_path):
    _png(tmp_path / "cat" / "a.png", (1, 2, 3), (8, 8))
    source = FolderSupport(tmp_path, size=8)
    before = source.settings("cat")
    _png(tmp_path / "cat" / "b.png", (1, 2, 3), (8, 8))
    assert source.settings("cat") != before
    assert source("cat").images.shape == (2, 3, 8, 8)


# --- mask proposers ----------------------------------------------------------------------------


def test_attention_proposer_thresholds():
    attribution = torch.tensor([[0.0, 0.1, 0.19, 0.2], [0.3, 0.5, 0.51, 0.9]])
    fg, bg = propose_masks("attention", torch.zeros(3, 2, 4), attribution)
    assert fg.tolist() == [[False] * 4, [False, False, True, True]]
    assert bg.tolist() == [[True, True, True, False], [False] * 4]
    with pytest.raises(ValueError, match="saliency"):
        propose_masks("attention", torch.zeros(3, 2, 4), None)
    with pytest.raises(ValueError, match=r"\(H, W\) = \(2, 4\)"):
        propose_masks("attention", torch.zeros(3, 2, 4), torch.zeros(4, 2))


def test_saliency_and_full_proposers():
    image = torch.full((3, 8, 8), 0.5)
    image[:, 2:6, 3:7] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    fg, bg = propose_masks("saliency", image, None)
    square = torch.zeros(8, 8, dtype=torch.bool)
    square[2:6, 3:7] = True
    assert torch.equal(fg, square) and torch.equal(bg, ~square)
    fg, bg = propose_masks("full", image, None)
    assert fg.all() and not bg.any()


def test_registry_is_extensible_and_names_kinds(monkeypatch):
    monkeypatch.setattr(masks, "_REGISTRY", dict(masks._REGISTRY))

    @register_mask_proposer("top_half")
    def _top_half():
        def propose(image, attribution):
            fg = torch.zeros(image.shape[1:], dtype=torch.bool)
            fg[: image.shape[1] // 2] = True
            return fg, ~fg

        return propose

    fg, bg = propose_masks("top_half", torch.zeros(3, 4, 2), None)
    assert fg.sum() == 4 and torch.equal(bg, ~fg)
    with pytest.raises(ValueError, match="already registered"):
        register_mask_proposer("attention")(_top_half)
    with pytest.raises(ValueError, match=r"unknown mask proposer 'sam'.*'attention'"):
        build_mask_proposer("sam")


def test_erode_cross_footprint_border_counts_as_set():
    mask = torch.zeros(5, 5, dtype=torch.bool)
    mask[1:4, 1:4] = True
    expected = torch.zeros(5, 5, dtype=torch.bool)
    expected[2, 2] = True
    assert torch.equal(erode(mask), expected)
    full = torch.ones(3, 3, dtype=torch.bool)
    assert torch.equal(erode(full), full)  # the image border does not erode


def _square(top: int, left: int, size: int, shape=(8, 8)) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[top : top + size, left : left + size] = True
    return mask


def test_rank_instance_masks_official_ranking():
    attribution = torch.full((8, 8), 0.05)
    attribution[1:4, 1:4] = 0.9  # the object
    attribution[5:8, 5:8] = 0.3  # a distractor
    obj = _square(0, 0, 5)  # mean (0.9 * 9 + 0.05 * 16) / 25 = 0.356
    distractor = _square(4, 4, 4)  # mean (0.3 * 9 + 0.05 * 7) / 16 = 0.191, overlaps obj at (4, 4)
    fg, bg = rank_instance_masks(torch.stack([distractor, obj]), attribution)
    assert torch.equal(fg, obj)  # (4, 4) goes to the higher-scoring obj
    # Lowest score: the complement of the union (mean 0.05), below 0.2 everywhere, eroded once.
    rest = ~(obj | distractor)
    assert torch.equal(bg, erode(rest))
    assert bg[0, 7] and bg[7, 0] and not bg[5, 0] and not bg[4, 6]
    # A mask of weight 0 ties with the zero of every mask not covering the pixel: the official
    # argmax gives its pixels to the top-ranked mask.
    attribution[attribution == 0.05] = 0.0
    fg, _ = rank_instance_masks(torch.stack([distractor, obj]), attribution)
    assert torch.equal(fg, obj | rest)
    # No instance: the threshold fallback.
    fg0, bg0 = rank_instance_masks(torch.zeros(0, 8, 8, dtype=torch.bool), attribution)
    assert torch.equal(fg0, attribution > 0.5) and torch.equal(bg0, attribution < 0.2)


def test_rank_instance_masks_official_edge_cases():
    attribution = torch.full((8, 8), 0.1)
    attribution[:, 4:] = 0.7
    left, right = torch.zeros(2, 8, 8, dtype=torch.bool)
    left[:, :4] = right[:, 4:] = True
    # (a) Instances covering every pixel: the empty complement's weight is 0/0 = NaN, which ranks
    # first and owns every pixel; fg is the whole image, bg the pixels below 0.2, eroded.
    whole = torch.ones(8, 8, dtype=torch.bool)
    for instances in (torch.stack([left, right]), torch.stack([left, right, ~whole])):
        fg, bg = rank_instance_masks(instances, attribution)
        assert torch.equal(fg, whole) and torch.equal(bg, erode(attribution < 0.2))
        assert bg.sum() == 8 * 3  # the left columns 0..2 (column 3 borders the 0.7 half)
    # (a') One empty instance mask among others: likewise NaN, whole-image foreground.
    fg, _ = rank_instance_masks(torch.stack([_square(2, 2, 3), ~whole]), attribution)
    assert torch.equal(fg, whole)
    # (b) The lowest-scoring instance (mean 0) lies inside a higher one and owns no pixel: the
    # background is the lowest-ranked mask that owns pixels, here the complement (mean 0.1).
    attribution = torch.full((8, 8), 0.1)
    attribution[:6, :6] = 0.8
    attribution[2:4, 2:4] = 0.0
    outer, inner = _square(0, 0, 6), _square(2, 2, 2)
    fg, bg = rank_instance_masks(torch.stack([outer, inner]), attribution)
    assert torch.equal(fg, outer)
    assert torch.equal(bg, erode(~outer)) and bg.sum() == 16  # row 7, column 7 and (6, 6)


def test_cutler_model_gets_rgb_scaled_and_resized_as_officially(monkeypatch):
    calls = []
    instance = _square(4, 8, 12, shape=(32, 48))

    def model(batch):  # a stand-in CutLER model: records its input
        calls.append(batch)
        return [{"instances": SimpleNamespace(pred_masks=instance[None])}]

    monkeypatch.setattr(masks, "_load_cutler", lambda *args: CutlerInstances(model, 800, 1333))
    image = torch.zeros(3, 32, 48)
    image[0], image[2] = 1.0, 0.5  # red 255, green 0, blue 127.5
    attribution = torch.where(instance, 0.9, 0.05)
    fg, bg = build_mask_proposer("cutler")(image, attribution)
    (item,) = calls[0]
    assert (item["height"], item["width"]) == (32, 48)
    pixels = item["image"]
    assert pixels.shape == (3, 800, 1200) and pixels.dtype == torch.float32  # short side 800
    # RGB order (the model's INPUT.FORMAT), 0..255, not BGR.
    assert torch.allclose(pixels.amin((1, 2)), torch.tensor([255.0, 0.0, 127.5]))
    assert torch.allclose(pixels.amax((1, 2)), torch.tensor([255.0, 0.0, 127.5]))
    assert torch.equal(fg, instance) and torch.equal(bg, erode(~instance))
    # torchvision's Resize(800, max_size=1333): the long side is capped, the short one follows.
    assert short_side_size(512, 512, 800, 1333) == (800, 800)
    assert short_side_size(512, 1024, 800, 1333) == (666, 1333)
    assert short_side_size(1024, 512, 800, 1333) == (1333, 666)


def test_cutler_without_detectron2_says_how_to_install():
    try:
        import detectron2  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install .*detectron2"):
            build_mask_proposer("cutler")
    else:
        pytest.skip("detectron2 is installed")
