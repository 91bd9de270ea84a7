"""SD+DINO (``method=sd_dino``): the fused pair descriptor equals the official pipeline written out
here (ODISE's sliding windows over a plain full UNet pass with forward hooks, a plain DINOv2
forward, the official co-PCA, fusion, normalisation and weights), the matching rule, the centred
frame, the window and layer rules, and settings errors that name their key."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.centred_frame import CentredFrame
from sdzero.correspondence.fusion import co_pca, pack, unpack
from sdzero.correspondence.sd_dino import SDDINO, pca_seed
from sdzero.correspondence.sd_windows import output_block_input, window_offsets
from sdzero.errors import ConfigError

TINY = {
    "image_size": 128,
    "sd_window": 64,
    "pca_dims": (3, 4, 5),  # unequal: the official weight slices then straddle layers
    "pca_solver": "svd",
    "layer_weights": (0.5, 2.0, 1.5),
    "sd_weight": 0.7,
    "dino_weight": 1.3,
    "dino_model": "tiny_dinov2",
    "dino_weights": "random",
    "dino_size": 112,
}
BACKBONE = {"arch": "tiny", "weights": None}


def make(**settings):
    method = SDDINO(BACKBONE, seed=3, **{**TINY, **settings})
    torch.manual_seed(0)  # the random DINOv2's weights
    method.setup("test")
    return method


@pytest.fixture(scope="module")
def method():
    return make()


def images(count=2, size=128, seed=0):
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ the official pipeline, by hand
def official_sd_layers(sd, image, t=100):
    """ODISE's raw s5, s4, s3 of a 128 px image in 64 px windows at offsets (0, 64): inputs of LDM
    output blocks 2, 5, 8 = outputs of up block 0's resnet 1 (no attention there), of up block
    1's attention 1 and of up block 2's attention 1, from a full UNet pass."""
    unet, ctx = sd.unet, sd.encode_prompt([""])
    modules = [unet.up_blocks[0].resnets[1], unet.up_blocks[1].attentions[1]]
    modules.append(unet.up_blocks[2].attentions[1])
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)[t].item()
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(42))
    noise = F.interpolate(noise, size=(8, 8), mode="bicubic", align_corners=False)
    sums = [torch.zeros(64, 2, 2), torch.zeros(64, 4, 4), torch.zeros(32, 8, 8)]
    counts = [torch.zeros(1, 2, 2), torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)]
    for y in (0, 64):
        for x in (0, 64):
            crop = image[None, :, y : y + 64, x : x + 64] * 2 - 1
            latent = sd.vae.encode(crop).latent_dist.mean * sd.vae.config.scaling_factor
            noisy = math.sqrt(abar) * latent + math.sqrt(1 - abar) * noise
            got = []

            def keep(_m, _a, out, got=got):
                got.append(out[0] if isinstance(out, tuple) else out)

            hooks = [m.register_forward_hook(keep) for m in modules]
            with torch.no_grad():
                unet(noisy, torch.tensor(t), encoder_hidden_states=ctx)
            for h in hooks:
                h.remove()
            for k, out in enumerate(got):
                stride = 64 // out.shape[-1]
                rows = slice(y // stride, (y + 64) // stride)
                cols = slice(x // stride, (x + 64) // stride)
                sums[k][:, rows, cols] += out[0]
                counts[k][:, rows, cols] += 1
    return [s / c for s, c in zip(sums, counts, strict=True)]


def official_dino(vit, image, size=112):
    """DINOv2's patch tokens of its last block (hub forward: interpolated position embeddings with
    the 0.1 offset, class token), on the picture resized to ``size``."""
    x = F.interpolate(
        image[None], size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    x = (x.clamp(0, 1) - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_DEFAULT_STD
    ).view(1, 3, 1, 1)
    patches = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (1, 64, D)
    pos, dim = vit.pos_embed, vit.embed_dim
    n = int(math.sqrt(pos.shape[1] - 1))
    w0 = size // 14 + 0.1
    grid = pos[:, 1:].reshape(1, n, n, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=(w0 / n, w0 / n), mode="bicubic")
    tokens = torch.cat(
        [vit.cls_token + pos[:, :1], patches + grid.permute(0, 2, 3, 1).reshape(1, -1, dim)], 1
    )
    with torch.no_grad():
        for block in vit.blocks:
            tokens = block(tokens)
    return tokens[0, 1:].T.reshape(dim, size // 14, size // 14)


def official_fusion(sd1, sd2, dino1, dino2, dims, weights, sd_w, dino_w):
    """co_pca (exact SVD), the s5/s4/s3 fold, the WEIGHT slices, normalisation, concatenation."""
    reduced = []
    for a, b, d in zip(sd1, sd2, dims, strict=True):
        rows = torch.cat([a.flatten(1), b.flatten(1)], dim=1).T
        centred = rows - rows.mean(0, keepdim=True)
        v = torch.linalg.svd(centred, full_matrices=False).Vh.T
        out = (centred @ v[:, :d]).T
        half = out.shape[1] // 2
        reduced.append(
            (out[:, :half].reshape(d, *a.shape[1:]), out[:, half:].reshape(d, *a.shape[1:]))
        )
    fused = []
    for side in (0, 1):
        s5, s4, s3 = (r[side][None] for r in reduced)
        s5 = F.interpolate(s5, size=s4.shape[-2:], mode="bilinear", align_corners=False)
        new_s5 = torch.cat([s4, s5], dim=1)
        desc = torch.cat([s3, F.interpolate(new_s5, size=s3.shape[-2:], mode="bilinear")], dim=1)[0]
        d0, d1, d2 = dims
        desc[:d0] *= weights[0]
        desc[d0 : d0 + d1] *= weights[1]
        desc[d0 + d1 : d0 + d1 + d2] *= weights[2]
        desc = desc / desc.norm(dim=0, keepdim=True)
        dino = (dino1, dino2)[side]
        dino = dino / dino.norm(dim=0, keepdim=True)
        fused.append(torch.cat([desc * sd_w, dino * dino_w]))
    return fused


def test_pair_descriptors_equal_the_official_pipeline(method):
    x = images()
    packed = method.features(x, ["a", "b"], "cat")
    parts = [unpack(f) for f in packed]
    got = method.pair_descriptors(packed[0], packed[1], "a", "b")
    sd_layers = [official_sd_layers(method.sd, x[i]) for i in (0, 1)]
    dino = [official_dino(method.dino.model, x[i]) for i in (0, 1)]
    for raw, want in zip(parts, [*sd_layers], strict=True):
        for r, w in zip(raw[:-1], want, strict=True):
            assert torch.allclose(r, w, rtol=1e-4, atol=1e-5)
    want = official_fusion(*sd_layers, *dino, (3, 4, 5), (0.5, 2.0, 1.5), 0.7, 1.3)
    for g, w in zip(got, want, strict=True):
        assert g.shape == (3 + 4 + 5 + method.dino.dim, 8, 8)
        assert (g - w).abs().max() <= 1e-4 * w.abs().max()


def test_raw_parts_shapes_and_batching(method):
    x = images()
    both = method.features(x, ["a", "b"], "cat")
    shapes = [tuple(p.shape) for p in unpack(both[0])]
    assert shapes == [(64, 2, 2), (64, 4, 4), (32, 8, 8), (method.dino.dim, 8, 8)]
    alone = method.features(x[1:], ["b"], "cat")[0]
    assert torch.allclose(alone, both[1], atol=1e-6)


def test_lowrank_co_pca_is_torch_pca_lowrank_on_its_own_stream():
    src, trg = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, b = co_pca(src, trg, 5, "lowrank", seed=77)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global stream is untouched
    rows = torch.cat([src.flatten(1), trg.flatten(1)], 1).T
    centred = rows - rows.mean(0, keepdim=True)
    torch.manual_seed(77)
    want = (centred @ torch.pca_lowrank(centred, q=5)[2]).T
    assert torch.allclose(torch.cat([a.flatten(1), b.flatten(1)], 1), want, atol=1e-6)
    assert pca_seed(0, "x", "y", 0) != pca_seed(0, "y", "x", 0) != pca_seed(1, "x", "y", 0)
    with pytest.raises(ValueError, match=r"method\.pca_dims"):
        co_pca(src, trg, 33)


def test_pack_round_trip():
    parts = [torch.randn(3, 2, 2), torch.randn(5, 4, 1)]
    back = unpack(pack(parts))
    assert len(back) == 2 and all(torch.equal(p, q) for p, q in zip(parts, back, strict=True))


@pytest.mark.parametrize("offset", [-0.5, 0.0])
def test_match_reads_the_source_patch_and_reports_the_official_centre(monkeypatch, offset):
    """One-hot position descriptors; the target's are the source's shifted by (+2, -1) cells, so
    every match is known. The source point reads the patch holding it (not a bilinear sample);
    the match is reported at the patch centre moved by patch_offset DINO pixels (sd-dino's -0.5:
    14 j + 6.5; GeoAware-SC's 0: 14 j + 7)."""
    method = SDDINO(BACKBONE, **{**TINY, "patch_offset": offset})
    g = 8
    eye = torch.eye(g * g).view(g * g, g, g)
    shifted = torch.roll(eye, shifts=(-1, 2), dims=(1, 2))  # target cell (i-1, j+2) = source (i, j)
    monkeypatch.setattr(method, "image_features", lambda image, name, category: image)
    monkeypatch.setattr(method, "pair_descriptors", lambda s, t, a, b: (eye, shifted))
    points = torch.tensor([[16.0 * 3 + 15.9, 16.0 * 5], [16.0 * 1 + 0.1, 16.0 * 2 + 8]])
    got = method.match(torch.zeros(1), torch.zeros(1), points, PairInfo())
    cell, dino_px = 16.0, 128 / 112
    want = torch.tensor(
        [[(3 + 2 + 0.5) * cell, (5 - 1 + 0.5) * cell], [(1 + 2 + 0.5) * cell, 1.5 * cell]]
    )
    assert torch.allclose(got, want + offset * dino_px)


def official_canvas(image_u8, size):
    """``utils_correspondence.resize(img, size, resize=True, to_pil=True, edge=False)``."""
    img = Image.fromarray(image_u8.permute(1, 2, 0).numpy())
    w, h = img.size
    canvas = np.zeros([size, size, 3], dtype=np.uint8)
    if h <= w:
        img = np.asarray(img.resize((size, int(np.around(size * h / w))), Image.Resampling.LANCZOS))
        canvas[(size - img.shape[0]) // 2 : (size + img.shape[0]) // 2] = img
    else:
        img = np.asarray(img.resize((int(np.around(size * w / h)), size), Image.Resampling.LANCZOS))
        canvas[:, (size - img.shape[1]) // 2 : (size + img.shape[1]) // 2] = img
    return torch.from_numpy(canvas).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("w, h", [(101, 57), (40, 90), (64, 64)])
def test_centred_frame_is_the_official_input_and_keypoints(w, h):
    u8 = torch.randint(
        0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(w)
    )
    frame = CentredFrame(w, h, 64)
    assert torch.equal(frame.image(u8)[0], official_canvas(u8, 64))
    kps = torch.tensor([[0.0, 0.0], [w - 1.0, h / 2]])
    scale = 64 / max(w, h)  # preprocess_kps_pad: one scale, the shorter axis offset by half the pad
    new = int(np.around(64 * min(w, h) / max(w, h)))
    off = int((64 - new) / 2)
    want = kps * scale + torch.tensor([off, 0.0] if h > w else [0.0, off])
    assert torch.allclose(frame.to_model(kps), want)
    assert torch.allclose(frame.to_original(frame.to_model(kps)), kps, atol=1e-5)


def test_window_offsets_follow_odise():
    assert window_offsets(960, 512) == [0, 448]
    assert window_offsets(512, 512) == [0]
    assert window_offsets(256, 512) == [0]
    assert window_offsets(128, 64) == [0, 64]
    assert window_offsets(1088, 512) == [0, 512, 576]


def test_output_block_input_is_what_output_block_reads(method):
    """For each LDM output block ``i`` (diffusers: resnet ``i % 3`` of up block ``i // 3``), the
    captured module's output is the first channels of that resnet's input (before the skip)."""
    unet = method.sd.unet
    assert output_block_input(unet, 0) == "mid_block"
    assert output_block_input(unet, 3) == "up_blocks.0.upsamplers.0"
    assert output_block_input(unet, 11) == "up_blocks.3.attentions.1"
    with pytest.raises(ValueError, match=r"method\.unet_blocks"):
        output_block_input(unet, 12)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = method.sd.encode_prompt([""])
    outs, ins = {}, {}

    def output_of(i):
        def hook(_m, _a, out):
            outs[i] = out[0] if isinstance(out, tuple) else out

        return hook

    def input_of(i):
        def hook(_m, args):
            ins[i] = args[0]

        return hook

    hooks = []
    for i in range(12):
        module = unet.get_submodule(output_block_input(unet, i))
        hooks.append(module.register_forward_hook(output_of(i)))
        resnet = unet.up_blocks[i // 3].resnets[i % 3]
        hooks.append(resnet.register_forward_pre_hook(input_of(i)))
    with torch.no_grad():
        unet(latents, torch.tensor(100), encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    for i in range(12):
        assert torch.equal(ins[i][:, : outs[i].shape[1]], outs[i]), i


@pytest.mark.parametrize(
    "key, value",
    [
        ("image_size", 100),
        ("sd_window", 96),
        ("timestep", 1000),
        ("unet_blocks", (8, 5, 2)),
        ("pca_dims", (256, 256)),
        ("layer_weights", (1.0,)),
        ("pca_dims", (0, 4, 4)),
        ("pca_solver", "exact"),
        ("prompt", "a {thing}"),
        ("dino_size", 10),
        ("dino_facet", "query"),
        ("window_batch", -1),
        ("fusion", "pca"),
    ],
)
def test_settings_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"method\.{key}"):
        SDDINO(BACKBONE, **{**TINY, key: value})


def test_weights_errors_and_grid_mismatch():
    with pytest.raises(ConfigError, match=r"method\.sd_weight"):
        SDDINO(BACKBONE, **{**TINY, "sd_weight": 0.0, "dino_weight": 0.0})
    with pytest.raises(ConfigError, match=r"method\.dino_size=56"):
        make(dino_size=56)
