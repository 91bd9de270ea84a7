"""DINOv2 through the ViT path: the hub models' layout, register tokens, the position-embedding
rules of the official ``interpolate_pos_encoding`` (offset, antialias), official checkpoints, and
features equal to the official forward written out here (facebookresearch/dinov2,
``DinoVisionTransformer.prepare_tokens_with_masks``)."""

import math

import huggingface_hub
import pytest
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from sdzero.backbones.errors import WeightsNotFoundError
from sdzero.backbones.tap import FeatureTap
from sdzero.backbones.vit import (
    _create,
    get_vit_spec,
    interpolate_pos_embed,
    load_backbone_model,
    register_vit,
    vit_names,
)
from sdzero.backbones.vit_features import ViTFeatureExtractor, build_vit_extractor

BLOCK_KEYS = [
    "norm1.weight",
    "norm1.bias",
    "attn.qkv.weight",
    "attn.qkv.bias",
    "attn.proj.weight",
    "attn.proj.bias",
    "ls1.gamma",
    "norm2.weight",
    "norm2.bias",
    "mlp.fc1.weight",
    "mlp.fc1.bias",
    "mlp.fc2.weight",
    "mlp.fc2.bias",
    "ls2.gamma",
]


def _official_shapes(dim, depth, registers, grid=37):
    """Keys and shapes of an official checkpoint (``dinov2_vit*14[_reg4]_pretrain.pth``) as the
    official ``DinoVisionTransformer`` (block_chunks=0) lays them out."""
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, 14, 14),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    widths = {"qkv.weight": (3 * dim, dim), "qkv.bias": (3 * dim,), "fc1.weight": (4 * dim, dim)}
    widths |= {"fc1.bias": (4 * dim,), "fc2.weight": (dim, 4 * dim), "proj.weight": (dim, dim)}
    for i in range(depth):
        for key in BLOCK_KEYS:
            shapes[f"blocks.{i}.{key}"] = widths.get(key.split(".", 1)[-1], (dim,))
    return shapes


def _official_state(model, registers, seed=0):
    """A random checkpoint in the official layout that our ``model`` architecture must accept."""
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dim = state["cls_token"].shape[-1]
    if registers:
        state["register_tokens"] = torch.randn(1, registers, dim, generator=g)
        del state["reg_token"]
        class_pos = torch.randn(1, 1, dim, generator=g)
        state["pos_embed"] = torch.cat([class_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = torch.randn(1, 1, dim, generator=g)
    state["mask_token"] = torch.zeros(1, dim)
    return state


def _official_tokens(model, state, images, block, offset, antialias):
    """Output tokens of ``block`` by the official forward: patches, class token, position
    embeddings (resampled unless the grid is native and the image square), then registers."""
    batch, _, height, width = images.shape
    x = model.patch_embed.proj(images).flatten(2).transpose(1, 2)
    pos = state["pos_embed"].float()
    side = math.isqrt(pos.shape[1] - 1)
    h0, w0 = height // 14, width // 14
    if not (h0 * w0 == side * side and height == width):
        if offset:
            how = {"scale_factor": ((h0 + offset) / side, (w0 + offset) / side)}
        else:
            how = {"size": (h0, w0)}
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **how)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)
    x = torch.cat([state["cls_token"].expand(batch, -1, -1), x], dim=1) + pos
    if "register_tokens" in state:
        registers = state["register_tokens"].expand(batch, -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
    for layer in model.blocks[: block + 1]:
        x = layer(x)
    return x


def _images(*shape, seed=1):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _normalised(images):
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    return (images - mean) / torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    ("name", "dim", "registers", "rule"),
    [
        ("dinov2_vits14", 384, 0, (0.1, False)),
        ("dinov2_vitb14", 768, 0, (0.1, False)),
        ("dinov2_vits14_reg", 384, 4, (0.0, True)),
        ("dinov2_vitb14_reg", 768, 4, (0.0, True)),
    ],
)
def test_hub_models_take_the_official_checkpoint_layout(name, dim, registers, rule):
    spec = get_vit_spec(name)
    assert (spec.pos_offset, spec.pos_antialias) == rule  # as dinov2/hub/backbones.py
    with torch.device("meta"):  # the real sizes, no memory
        model = _create(spec, None, torch.float32)
    assert model.patch_embed.patch_size == (14, 14) and model.patch_embed.img_size == (518, 518)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = _official_shapes(dim, 12, registers)
    # timm's layout: no mask_token; registers renamed, the class position row folded away.
    official.pop("mask_token")
    if registers:
        official["reg_token"] = official.pop("register_tokens")
        official["pos_embed"] = (1, 37 * 37, dim)
    assert ours == official


def test_random_hub_model_has_layerscale_one_and_register_shapes():
    torch.manual_seed(0)
    extractor = build_vit_extractor("dinov2_vits14_reg", weights="random", facet="token")
    model = extractor.model
    assert all(torch.all(b.ls1.gamma == 1) and torch.all(b.ls2.gamma == 1) for b in model.blocks)
    with torch.no_grad():
        features = extractor(_images(1, 3, 28, 42))
    assert features.shape == (1, 384, 2, 3) and extractor.num_prefix_tokens == 5


@pytest.mark.parametrize(("name", "registers"), [("tiny_dinov2", 0), ("tiny_dinov2_reg", 4)])
@pytest.mark.parametrize("size", [(56, 56), (56, 84), (70, 42)])
def test_tokens_and_keys_equal_the_official_forward_of_an_official_checkpoint(
    name, registers, size, tmp_path
):
    torch.manual_seed(0)
    architecture = load_backbone_model(name, weights="random")
    state = _official_state(architecture, registers)
    path = tmp_path / "dinov2_pretrain.pth"
    torch.save(state, path)
    model = load_backbone_model(name, weights=str(path))
    if registers:  # timm's conversion: registers renamed, class position folded into cls_token
        assert torch.equal(model.reg_token, state["register_tokens"])
        assert torch.equal(model.cls_token, state["cls_token"] + state["pos_embed"][:, :1])
        assert torch.equal(model.pos_embed, state["pos_embed"][:, 1:])
    spec = get_vit_spec(name)
    images = _images(2, 3, *size)
    grid = (size[0] // 14, size[1] // 14)
    with torch.no_grad():
        reference = _official_tokens(
            model, state, _normalised(images), 2, spec.pos_offset, spec.pos_antialias
        )
        tokens = ViTFeatureExtractor(
            model, -1, "token", pos_offset=spec.pos_offset, pos_antialias=spec.pos_antialias
        )(images)
        keys = build_vit_extractor(name, weights=str(path), facet="key")(images)
        # Keys of the last block from the tokens entering it (the official forward's).
        entering = _official_tokens(
            model, state, _normalised(images), 1, spec.pos_offset, spec.pos_antialias
        )
        qkv = model.blocks[2].attn.qkv(model.blocks[2].norm1(entering))
    prefix = 1 + registers
    assert tokens.shape == (2, 32, *grid)
    as_tokens = tokens.flatten(2).transpose(1, 2)
    torch.testing.assert_close(as_tokens, reference[:, prefix:], rtol=0, atol=1e-5)
    torch.testing.assert_close(
        keys.flatten(2).transpose(1, 2), qkv[:, prefix:, 32:64], rtol=0, atol=1e-5
    )


def test_register_tokens_reach_the_blocks_without_position_embeddings():
    torch.manual_seed(0)
    extractor = build_vit_extractor("tiny_dinov2_reg", weights="random", facet="token")
    model = extractor.model
    with (
        torch.no_grad(),
        FeatureTap(model, outputs=["norm_pre"]) as tap,  # the tokens entering block 0
    ):
        got = tap.run(lambda: extractor(_images(1, 3, 56, 84)))
    entering = got.outputs["norm_pre"]
    assert entering.shape == (1, 1 + 4 + 4 * 6, 32)
    assert torch.equal(entering[0, 1:5], model.reg_token[0])


@pytest.mark.parametrize(("offset", "antialias"), [(0.1, False), (0.0, False), (0.0, True)])
def test_pos_embed_at_the_training_grid_is_the_identity(offset, antialias):
    pos = torch.randn(1 + 37 * 37, 8, generator=torch.Generator().manual_seed(0))
    kw = {"offset": offset, "antialias": antialias}
    assert interpolate_pos_embed(pos, (37, 37), **kw) is pos
    patches = pos[1:]
    assert interpolate_pos_embed(patches, (37, 37), class_row=False, **kw) is patches
    if not offset:  # a size-based resize to the same size samples the grid points themselves
        assert torch.equal(interpolate_pos_embed(pos, (37, 37), force=True, **kw), pos)


def _cubic(x, a):
    """PyTorch's bicubic kernel: Keys with a = -0.75, or a = -0.5 for the antialiased one."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x**3 - (a + 3) * x**2 + 1
    return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0


@pytest.mark.parametrize(
    ("offset", "antialias", "scale", "a"),
    [
        (0.1, False, 6.1 / 4, -0.75),  # DINOv2 / DINO: scale factor (6 + 0.1) / 4
        (0.0, False, 6 / 4, -0.75),  # offset 0: resize to 6 rows, scale 6 / 4
        (0.0, True, 6 / 4, -0.5),  # the register models: antialiased kernel
    ],
)
def test_offset_and_antialias_change_the_grid_as_the_official_formula(offset, antialias, scale, a):
    # A ramp along rows of a 4x4 grid, resampled to 6x4: output row r samples source row
    # t = (r + 0.5) / scale - 0.5; rows 2 and 3 have all four taps inside the grid.
    ramp = torch.arange(4.0).view(4, 1, 1).expand(4, 4, 1).reshape(16, 1)
    pos = torch.cat([torch.zeros(1, 1), ramp])
    rows = interpolate_pos_embed(pos, (6, 4), offset=offset, antialias=antialias)[1:].view(6, 4)
    for r in (2, 3):
        t = (r + 0.5) / scale - 0.5
        taps = range(math.floor(t) - 1, math.floor(t) + 3)
        expected = sum(i * _cubic(t - i, a) for i in taps)
        assert rows[r, 0].item() == pytest.approx(expected, abs=1e-5)
        torch.testing.assert_close(rows[r], rows[r, :1].expand(4))  # columns do not mix


def test_the_three_rules_give_different_grids():
    pos = torch.randn(1 + 16, 3, generator=torch.Generator().manual_seed(2))
    grids = [
        interpolate_pos_embed(pos, (7, 5), offset=o, antialias=aa)
        for o, aa in ((0.1, False), (0.0, False), (0.0, True))
    ]
    assert all((x - y).abs().max() > 1e-3 for i, x in enumerate(grids) for y in grids[i + 1 :])


def test_own_checkpoint_round_trip_and_registry(tmp_path):
    torch.manual_seed(3)
    saved = load_backbone_model("tiny_dinov2_reg", weights="random")
    path = tmp_path / "weights.pth"
    torch.save(saved.state_dict(), path)
    loaded = load_backbone_model("tiny_dinov2_reg", weights=str(path))
    reference = saved.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())
    assert {"dinov2_vits14", "dinov2_vitb14", "dinov2_vits14_reg", "dinov2_vitb14_reg"} <= set(
        vit_names()
    )
    with pytest.raises(ValueError, match="'dinov2_vitb14' is already registered"):
        register_vit("dinov2_vitb14", get_vit_spec("dinov2_vits14"))


def test_offline_pretrained_dinov2_is_one_clear_error(monkeypatch):
    repo = "timm/vit_base_patch14_dinov2.lvd142m"
    if isinstance(huggingface_hub.try_to_load_from_cache(repo, "model.safetensors"), str):
        pytest.skip(f"{repo} is in the local cache, so loading would succeed")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(WeightsNotFoundError, match=r"timm\.create_model\('vit_base_patch14_dino"):
        load_backbone_model("dinov2_vitb14", weights="pretrained")
