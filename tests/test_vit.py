"""DINO/CLIP feature extractors and the CLIP classifier, on tiny random models with the same code
paths as the real ones (timm ViT for DINO, open_clip ViT for CLIP)."""

import logging

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from sdzero.backbones.clip_text import build_clip_classifier
from sdzero.backbones.errors import WeightsNotFoundError
from sdzero.backbones.vit import interpolate_pos_embed, load_backbone_model
from sdzero.backbones.vit_features import ViTFeatureExtractor, build_vit_extractor

IMAGENET = (
    torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1),
    torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1),
)


def _extractor(name, **kwargs):
    torch.manual_seed(0)
    return build_vit_extractor(name, weights="random", **kwargs)


@pytest.fixture(scope="module")
def tiny_vit():
    return _extractor("tiny_vit8")


@pytest.fixture(scope="module")
def tiny_clip():
    return _extractor("tiny_clip16")


@pytest.fixture(scope="module")
def tiny(tiny_vit, tiny_clip):
    """Name -> extractor with the default block; its ``.model`` is reused for other blocks."""
    return {"tiny_vit8": tiny_vit, "tiny_clip16": tiny_clip}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return build_clip_classifier("tiny_clip16", weights="random")


def _images(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _full_model_run(extractor, images, block_index):
    """Run the WHOLE model (its own forward); return the block and the tokens entering and
    leaving it."""
    model = extractor.model
    is_timm = hasattr(model, "blocks")
    block = (model.blocks if is_timm else model.transformer.resblocks)[block_index]
    seen = {}
    handles = [
        block.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0])),
        block.register_forward_hook(lambda m, args, out: seen.setdefault("out", out)),
    ]
    normalised = (images - IMAGENET[0]) / IMAGENET[1]
    with torch.no_grad():
        model.forward_features(normalised) if is_timm else model(normalised)
    for handle in handles:
        handle.remove()
    return block, seen["in"], seen["out"]


def _manual_keys(block, tokens):
    """Key slice of the qkv projection of the block's normed input, class token dropped."""
    if hasattr(block, "norm1"):  # timm
        qkv = block.attn.qkv(block.norm1(tokens))
        dim = qkv.shape[-1] // 3
        return qkv[:, 1:, dim : 2 * dim]
    attn = block.attn
    dim = attn.embed_dim
    keys = F.linear(
        block.ln_1(tokens), attn.in_proj_weight[dim : 2 * dim], attn.in_proj_bias[dim : 2 * dim]
    )
    return keys[:, 1:]


@pytest.mark.parametrize(
    ("name", "size", "grid", "block"),
    [
        ("tiny_vit8", (32, 32), (4, 4), 2),
        ("tiny_vit8", (48, 64), (6, 8), 2),
        ("tiny_clip16", (32, 32), (2, 2), 1),
        ("tiny_clip16", (48, 80), (3, 5), 1),
    ],
)
def test_output_shape_on_patch_grid(name, size, grid, block, tiny_vit, tiny_clip):
    extractor = tiny_vit if name == "tiny_vit8" else tiny_clip
    assert extractor.block == block  # OVDiff's defaults: last block (DINO), block -2 (CLIP)
    assert extractor.dim == 32
    with torch.no_grad():
        features = extractor(_images(2, 3, *size))
    assert features.shape == (2, 32, *grid)
    assert torch.isfinite(features).all()


@pytest.mark.parametrize("name", ["tiny_vit8", "tiny_clip16"])
@pytest.mark.parametrize("block", [0, -1, None])
def test_keys_equal_manual_projection_on_full_model(name, block, tiny):
    default = tiny[name]
    extractor = default if block is None else ViTFeatureExtractor(default.model, block)
    images = _images(2, 3, 32, 32)  # the native size: the full model needs no resampling
    with torch.no_grad():
        features = extractor(images)
        # Runs after the extractor: a key hook left behind would stop this full pass.
        layer, tokens, _ = _full_model_run(extractor, images, extractor.block)
        expected = _manual_keys(layer, tokens)
    torch.testing.assert_close(features.flatten(2).transpose(1, 2), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_vit8", "tiny_clip16"])
def test_tokens_equal_full_model_block_output(name, tiny):
    extractor = ViTFeatureExtractor(tiny[name].model, 0, facet="token")
    images = _images(1, 3, 32, 32)
    with torch.no_grad():
        features = extractor(images)
        _, _, output = _full_model_run(extractor, images, 0)
    torch.testing.assert_close(
        features.flatten(2).transpose(1, 2), output[:, 1:], rtol=0, atol=1e-6
    )


@pytest.mark.parametrize(
    ("name", "facet", "mlp_calls"),
    [("tiny_vit8", "key", 0), ("tiny_clip16", "key", 0), ("tiny_clip16", "token", 1)],
)
def test_computation_stops_at_the_chosen_block(name, facet, mlp_calls, tiny):
    extractor = ViTFeatureExtractor(tiny[name].model, 0, facet=facet)
    model = extractor.model
    blocks = model.blocks if hasattr(model, "blocks") else model.transformer.resblocks
    calls = [0] * (len(blocks) + 1)  # one counter per block, then the chosen block's MLP

    def counter(index):
        return lambda module, args: calls.__setitem__(index, calls[index] + 1)

    handles = [blk.register_forward_pre_hook(counter(i)) for i, blk in enumerate(blocks)]
    handles.append(blocks[0].mlp.register_forward_pre_hook(counter(-1)))
    with torch.no_grad():
        extractor(_images(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    assert calls == [1] + [0] * (len(blocks) - 1) + [mlp_calls]


def test_pos_embed_resampling_invariants():
    torch.manual_seed(0)
    pos = torch.randn(1 + 16, 5)
    assert interpolate_pos_embed(pos, (4, 4)) is pos
    constant = torch.full((1 + 16, 5), 0.7)
    resampled = interpolate_pos_embed(constant, (6, 9))
    assert resampled.shape == (1 + 54, 5)
    torch.testing.assert_close(resampled, torch.full_like(resampled, 0.7))
    # Class row untouched; rows and columns are treated alike (transposing commutes).
    out = interpolate_pos_embed(pos, (6, 9))
    assert torch.equal(out[0], pos[0])
    transposed = torch.cat([pos[:1], pos[1:].view(4, 4, 5).transpose(0, 1).reshape(16, 5)])
    out_t = interpolate_pos_embed(transposed, (9, 6))
    torch.testing.assert_close(out_t[1:].view(9, 6, 5).transpose(0, 1), out[1:].view(6, 9, 5))


def _keys_cubic(x, a=-0.75):
    """PyTorch's bicubic kernel (Keys, a = -0.75) at offset ``x``."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0


def test_pos_embed_uses_dino_scale_convention():
    # A ramp along rows, 4 -> 8 rows. With DINO's scale factor 8.1 / 4, output row r samples
    # source row t = (r + 0.5) / 2.025 - 0.5 (a size-based resize would use / 2); for r = 3, 4 all
    # four taps 0..3 are in range, so the value is sum_i i * kernel(t - i), computed by hand.
    ramp = torch.arange(4.0).view(4, 1, 1).expand(4, 4, 1).reshape(16, 1)
    pos = torch.cat([torch.zeros(1, 1), ramp])
    rows = interpolate_pos_embed(pos, (8, 4))[1:].view(8, 4)
    for r in (3, 4):
        t = (r + 0.5) / 2.025 - 0.5
        size_based = (r + 0.5) / 2 - 0.5
        expected = sum(i * _keys_cubic(t - i) for i in range(4))
        assert rows[r, 0].item() == pytest.approx(expected, abs=1e-5)
        assert abs(expected - sum(i * _keys_cubic(size_based - i) for i in range(4))) > 1e-2
        torch.testing.assert_close(rows[r], rows[r, :1].expand(4))  # columns do not mix


def test_normalisation_option(tiny_vit):
    images = _images(1, 3, 32, 32)
    clip_norm = _extractor("tiny_vit8", normalization="clip")
    assert torch.equal(clip_norm.mean.flatten(), torch.tensor(OPENAI_CLIP_MEAN))
    assert torch.equal(tiny_vit.mean.flatten(), torch.tensor(IMAGENET_DEFAULT_MEAN))
    with torch.no_grad():
        # Same weights (same seed); CLIP statistics applied to images renormalised by hand.
        rescaled = (images - IMAGENET[0]) / IMAGENET[1] * torch.tensor(OPENAI_CLIP_STD).view(
            1, 3, 1, 1
        ) + torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
        torch.testing.assert_close(clip_norm(rescaled), tiny_vit(images), rtol=0, atol=1e-5)


def test_bad_images_are_rejected(tiny_vit):
    with pytest.raises(ValueError, match=r"7x32 \(HxW\) is smaller than one patch \(8 px\)"):
        tiny_vit(torch.rand(1, 3, 7, 32))
    with pytest.raises(ValueError, match=r"expected images as a float tensor \(B, 3, H, W\)"):
        tiny_vit(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"got \(1, 32, 32, 3\)"):
        tiny_vit(torch.rand(1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"torch.uint8"):
        tiny_vit(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))


def test_bad_arguments_are_rejected(tmp_path, tiny_vit):
    from sdzero.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"unknown ViT backbone 'dino' \(method\.extractors.*expected one of"
    ):
        build_vit_extractor("dino", weights="random")
    with pytest.raises(ValueError, match=r"facet='query'"):
        ViTFeatureExtractor(tiny_vit.model, -1, facet="query")
    with pytest.raises(ValueError, match=r"block=3 is out of range for a ViT with 3 blocks"):
        ViTFeatureExtractor(tiny_vit.model, 3)
    with pytest.raises(TypeError, match=r"got Linear"):
        ViTFeatureExtractor(torch.nn.Linear(2, 2), 0)
    with pytest.raises(ValueError, match=r"normalization='imagenett'"):
        _extractor("tiny_vit8", normalization="imagenett")
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"nope.pth.*neither 'pretrained', 'random'"):
        build_vit_extractor("tiny_vit8", weights=str(missing))
    with pytest.raises(WeightsNotFoundError, match=r"'tiny_clip16' is a test architecture"):
        build_vit_extractor("tiny_clip16", weights="pretrained")


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="sdzero.backbones.vit"):
        _extractor("tiny_vit8")
    assert any("RANDOM WEIGHTS for backbone 'tiny_vit8'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["tiny_vit8", "tiny_clip16"])
def test_local_checkpoint_round_trip(name, tmp_path):
    torch.manual_seed(3)
    saved = load_backbone_model(name, weights="random")
    path = tmp_path / "weights.pth"
    torch.save(saved.state_dict(), path)
    loaded = load_backbone_model(name, weights=str(path))
    reference = saved.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit.pth"
    torch.save(load_backbone_model("tiny_vit8", weights="random").state_dict(), path)
    with pytest.raises(
        WeightsNotFoundError, match=r"vit.pth' could not be loaded into backbone 'tiny_clip16'"
    ):
        load_backbone_model("tiny_clip16", weights=str(path))


def _cached(repo, *files):
    return any(isinstance(huggingface_hub.try_to_load_from_cache(repo, f), str) for f in files)


@pytest.mark.parametrize(
    ("name", "repo", "files", "command"),
    [
        (
            "dino_vitb8",
            "timm/vit_base_patch8_224.dino",
            ("model.safetensors", "pytorch_model.bin"),
            "timm.create_model('vit_base_patch8_224.dino', pretrained=True)",
        ),
        (
            "clip_vitb16",
            "timm/vit_base_patch16_clip_224.openai",
            ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"),
            "open_clip.create_model('ViT-B-16', pretrained='openai')",
        ),
    ],
)
def test_offline_pretrained_is_one_clear_error(name, repo, files, command, monkeypatch):
    if _cached(repo, *files):
        pytest.skip(f"{repo} is in the local cache, so loading would succeed")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError) as info:
        load_backbone_model(name, weights="pretrained")
    message = str(info.value)
    assert f"pretrained weights of {name!r}" in message
    assert command in message
    assert "weights=/path/to/checkpoint" in message


def test_clip_embeddings_are_unit_norm(classifier):
    with torch.no_grad():
        text = classifier.encode_text(["a cat", "a dog", "a cat"])
        image = classifier.encode_image(_images(2, 3, 50, 70))
    assert text.shape == (3, 16) and image.shape == (2, 16)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(2))
    assert torch.equal(text[0], text[2]) and not torch.allclose(text[0], text[1])


def test_clip_image_at_input_size_uses_clip_statistics(classifier):
    images = _images(2, 3, 32, 32)  # the tiny model's input size: no resize
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(classifier.model.encode_image((images - mean) / std), dim=-1)
        torch.testing.assert_close(classifier.encode_image(images), expected)
        # A flat grey image stays flat under any resize: same embedding at every input size.
        grey = classifier.encode_image(torch.full((1, 3, 32, 32), 0.4))
        torch.testing.assert_close(classifier.encode_image(torch.full((1, 3, 90, 60), 0.4)), grey)


def test_clip_image_resize_is_bilinear_without_antialias(classifier):
    # The official filter resizes the 512² image to 224² by torchvision 0.13's tensor Resize.
    images = _images(1, 3, 64, 80)
    mean = torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1)
    small = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    with torch.no_grad():
        expected = F.normalize(classifier.model.encode_image((small - mean) / std), dim=-1)
        torch.testing.assert_close(classifier.encode_image(images), expected)
        aa = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
        other = F.normalize(classifier.model.encode_image((aa - mean) / std), dim=-1)
    assert (other - expected).abs().max() > 1e-3  # the check can tell the two modes apart


def test_clip_classifier_bad_input(classifier):
    with pytest.raises(ValueError, match=r"non-empty list of prompt strings, got 'a cat'"):
        classifier.encode_text("a cat")
    with pytest.raises(ValueError, match=r"got \[\]"):
        classifier.encode_text([])
    with pytest.raises(ValueError, match=r"got \(3, 32, 32\)"):
        classifier.encode_image(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"'tiny_vit8' is not a CLIP model"):
        build_clip_classifier("tiny_vit8", weights="random")
