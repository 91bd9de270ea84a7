"""OVDiff's test-time inputs as the official code builds them: DINO window sizes (``predict.py``
``ViTFeats.resize``), the patch remainder the ViT drops, the score map stretched back over the
window, and the CLIP filter's precision (fp16 on CUDA, fp32 on CPU)."""

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from open_clip.transformer import LayerNormFp32

from sdzero.backbones.clip_text import build_clip_classifier
from sdzero.backbones.vit import interpolate_pos_embed
from sdzero.segmentation.features import ColourExtractor, build_extractor, dino_input_size
from sdzero.segmentation.filters import clip_filter_dtype
from sdzero.segmentation.inference import ScoreAccumulator, Window
from sdzero.segmentation.module import OVDiffModule
from sdzero.segmentation.settings import OVDiffSettings


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dino():
    return build_extractor("dino:tiny_vit8", vit_weights="random")


# --- DINO window sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((448, 448), (448, 448)),  # 448 crop
        ((336, 336), (336, 336)),  # 336 crop
        ((100, 130), (100, 130)),  # both sides <= 448: kept, even if not a patch multiple
        ((448, 603), (448, 603)),  # full image, long side <= 800: kept
        ((603, 448), (603, 448)),
        ((448, 800), (448, 800)),
        ((448, 801), (447, 800)),  # int(800 * 448 / 801) = 447
        ((448, 1000), (358, 800)),  # int(800 * 448 / 1000) = 358
        ((1000, 448), (800, 358)),
        ((450, 600), (448, 597)),  # short side 450 > 448: to 448, long int(448 * 600 / 450)
        ((300, 600), (400, 800)),  # up to 448 x 896, then capped: int(800 * 448 / 896) = 400
    ],
)
def test_dino_input_size_is_the_official_rule(size, expected):
    assert dino_input_size(*size) == expected
    if max(size) > 448:  # torchvision's own resize(img, 448, max_size=800) agrees
        resized = TF.resize(torch.zeros(1, *size), 448, max_size=800, antialias=False)
        assert tuple(resized.shape[-2:]) == expected


def test_dino_full_image_window_is_kept_and_its_remainder_dropped(dino):
    # A full-image window 448 x 603 (H x W): not resized; the patch grid is floor(603 / 8) = 75
    # columns, and the 3 leftover columns never reach a patch: features of the 448 x 600 crop.
    window = _rand(1, 3, 448, 603)
    prepared = dino.prepare(window)
    assert prepared is window
    features = dino(prepared)
    assert features.shape == (1, dino.dim, 56, 75)
    assert torch.equal(features, dino(window[..., :600]))
    # The last column still matters: it is a real patch, not padding.
    changed = window.clone()
    changed[..., 592:600] = 0
    assert not torch.allclose(dino(changed)[..., -1], features[..., -1])


def test_dino_window_above_800_is_bilinear_without_antialias(dino):
    window = _rand(1, 3, 448, 1000, seed=1)
    prepared = dino.prepare(window)
    expected = F.interpolate(window, size=(358, 800), mode="bilinear", align_corners=False)
    assert torch.equal(prepared, expected)
    assert torch.equal(prepared, TF.resize(window, 448, max_size=800, antialias=False))
    assert dino(prepared).shape == (1, dino.dim, 44, 100)  # 358 // 8 = 44 rows, 6 px dropped


def test_position_embeddings_follow_dinos_square_rule(dino):
    # DINO skips the resampling only at the native grid of a square image (tiny: 4 x 4 at 32 px).
    pos = _rand(1 + 16, 5)
    assert interpolate_pos_embed(pos, (4, 4)) is pos
    forced = interpolate_pos_embed(pos, (4, 4), force=True)  # scale 4.1 / 4: shifted samples
    assert forced.shape == pos.shape and torch.equal(forced[0], pos[0])
    assert (forced[1:] - pos[1:]).abs().max() > 1e-3
    images = _rand(1, 3, 32, 39, seed=2)
    square = dino(images[..., :32])
    assert square.shape == dino(images).shape == (1, dino.dim, 4, 4)
    assert not torch.allclose(dino(images), square)  # 32 x 39 resamples, 32 x 32 does not
    assert torch.equal(dino(images), dino(images[..., :38]))  # both non-square, same patches


def test_clip_windows_go_to_448_square_bilinear_without_antialias():
    clip = build_extractor("clip:tiny_clip16", vit_weights="random")
    for size in ((336, 336), (448, 448), (448, 603)):
        window = _rand(1, 3, *size, seed=3)
        expected = F.interpolate(window, size=(448, 448), mode="bilinear", align_corners=False)
        assert torch.equal(clip.prepare(window), expected)


def test_colour_windows_are_kept_and_their_remainder_dropped():
    colour = ColourExtractor()
    window = _rand(1, 3, 21, 19, seed=4)
    assert colour.prepare(window) is window
    assert torch.equal(colour(window), colour(window[..., :16, :16]))
    assert colour(window).shape == (1, 7, 2, 2)


def test_window_scores_are_stretched_over_the_whole_window():
    # Official predict.py: the (56, 75) map is resized to the window's (448, 603), so the three
    # dropped columns get scores too and the cells are 603 / 75 px wide, not 8.
    scores = torch.linspace(-1, 1, 75).expand(2, 56, 75).contiguous()
    acc = ScoreAccumulator(2, 448, 603)
    acc.add(Window(0, 0, 603, 448), scores)
    expected = F.interpolate(scores[None], size=(448, 603), mode="bilinear", align_corners=False)
    assert torch.equal(acc.mean(), expected[0])
    assert acc.mean()[0, 0, -1] == pytest.approx(1.0)


# --- CLIP filter precision ---------------------------------------------------------------------


def test_clip_filter_dtype_is_fp16_on_cuda_only_under_auto():
    assert OVDiffSettings().clip_filter_dtype == "auto"
    assert clip_filter_dtype("auto", "cuda") == torch.float16
    assert clip_filter_dtype("auto", torch.device("cuda", 1)) == torch.float16
    assert clip_filter_dtype("auto", "cpu") == torch.float32
    assert clip_filter_dtype("float32", "cuda") == torch.float32
    with pytest.raises(ValueError, match=r"clip_filter_dtype must be one of \['auto', 'float32'\]"):
        clip_filter_dtype("float16", "cuda")
    with pytest.raises(ValueError, match=r"method.clip_filter_dtype must be one of"):
        OVDiffSettings(clip_filter_dtype="half")


def _dtypes_seen(classifier):
    """Run both towers; the dtypes entering the first linear layer of each and the class of the
    layer norms."""
    seen = []
    hooks = [
        classifier.model.visual.transformer.resblocks[0].mlp.c_fc.register_forward_pre_hook(
            lambda m, args: seen.append(("image", args[0].dtype))
        ),
        classifier.model.transformer.resblocks[0].mlp.c_fc.register_forward_pre_hook(
            lambda m, args: seen.append(("text", args[0].dtype))
        ),
    ]
    with torch.no_grad():
        image = classifier.encode_image(_rand(1, 3, 64, 80, seed=5))
        text = classifier.encode_text(["a cat", "a dog"])
    for hook in hooks:
        hook.remove()
    return dict(seen), image, text


def test_clip_classifier_runs_in_the_dtype_it_is_built_with():
    torch.manual_seed(0)
    full = build_clip_classifier("tiny_clip16", weights="random")
    torch.manual_seed(0)
    half = build_clip_classifier("tiny_clip16", weights="random", dtype=torch.float16)
    assert full.dtype == torch.float32 and half.dtype == torch.float16
    # OpenAI's half precision: layer norms compute in fp32, their weights stay fp32.
    assert isinstance(half.model.visual.ln_pre, LayerNormFp32)
    assert half.model.visual.ln_pre.weight.dtype == torch.float32
    seen_full, image_full, text_full = _dtypes_seen(full)
    seen_half, image_half, text_half = _dtypes_seen(half)
    assert seen_full == {"image": torch.float32, "text": torch.float32}
    assert seen_half == {"image": torch.float16, "text": torch.float16}
    for out in (image_half, text_half):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(out)), atol=2e-3, rtol=0)
    # Same weights up to fp16 rounding: close to, but not equal to, the fp32 embeddings.
    torch.testing.assert_close(image_half, image_full, atol=2e-2, rtol=0)
    torch.testing.assert_close(text_half, text_full, atol=2e-2, rtol=0)
    assert not torch.equal(image_half, image_full)


class _Built(Exception):
    pass


@pytest.mark.parametrize(
    ("device", "setting", "expected"),
    [
        ("cpu", "auto", torch.float32),
        ("cuda:0", "auto", torch.float16),
        ("cuda:0", "float32", torch.float32),
    ],
)
def test_module_builds_the_filter_in_the_settings_dtype(monkeypatch, device, setting, expected):
    import sdzero.backbones.clip_text as clip_text

    got = {}

    def record(name, weights, dtype):
        got.update(name=name, dtype=dtype)
        raise _Built  # stop before any model or prototype work

    monkeypatch.setattr(clip_text, "build_clip_classifier", record)
    module = OVDiffModule({"arch": "tiny"}, clip_filter_dtype=setting)
    module._device = torch.device(device)  # no GPU here: only the decision is under test
    with pytest.raises(_Built):
        module.prepare(["background", "cat", "dog"])
    assert got == {"name": "clip_vitb16", "dtype": expected}
