"""The prompt-optimisation correspondence method on the tiny random-weight backbone."""

import pytest
import torch
import torch.nn.functional as F

from sdzero.backbones.attention import cross_attention_layers
from sdzero.correspondence.crops import (
    corner_crops,
    crop_size,
    cut_and_resize,
    random_crop_around,
    to_crop_frame,
)
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence, gaussian_targets, item_generator
from sdzero.tasks.frames import ModelFrame

S = 128


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=S, mode="bilinear")


def _cfg(**kw):
    base = dict(image_size=S, steps=3, num_embeddings=2, inference_crops=5, lr=0.05)
    return FitConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ geometry


def test_crop_size_matches_the_official_477_px():
    assert crop_size(512, FitConfig().crop_fraction) == 477
    with pytest.raises(ValueError, match="crop_fraction"):
        crop_size(512, 1.5)


def test_random_crops_keep_the_margin_and_stay_inside():
    g = torch.Generator().manual_seed(0)
    size, margin = 477, int(477 * 0.15)
    for q in [(100.0, 300.0), (256.0, 256.0), (400.5, 120.25)]:
        for _ in range(50):
            x0, y0, s = random_crop_around(q, 512, size, 0.15, g)
            assert s == size and 0 <= x0 <= 512 - size and 0 <= y0 <= 512 - size
            assert x0 + margin <= q[0] <= x0 + size - margin
            assert y0 + margin <= q[1] <= y0 + size - margin
    # too close to the border for the 71 px margin: the nearest feasible crop
    assert random_crop_around((3.0, 509.0), 512, size, 0.15, g)[:2] == (0, 35)


def test_random_crop_bounds_are_truncated_as_the_official_code():
    # q = 420.3: the offset range is [420.3 - 477 + 71, 35] = [14.3, 35], truncated to 14..35
    # (rounding the lower bound up would lose offset 14, where q sits 70.7 px from the border)
    g = torch.Generator().manual_seed(0)
    seen = {random_crop_around((420.3, 100.0), 512, 477, 0.15, g)[0] for _ in range(600)}
    assert seen == set(range(14, 36))


def test_corner_crops_and_crop_frame():
    # the official order: TL, BL, TR, BR (x offset slowest)
    assert corner_crops(512, 477) == [(0, 0, 477), (0, 35, 477), (35, 0, 477), (35, 35, 477)]
    p = torch.tensor([135.0, 35.0 + 477 / 2])
    torch.testing.assert_close(
        to_crop_frame(p, (35, 35, 477), 512), torch.tensor([107.337, 256.0]), atol=1e-3, rtol=0
    )
    img = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8) / 400
    out = cut_and_resize(img, [(0, 0, 4), (4, 4, 4)], 4)
    assert torch.equal(out[1], img[1, :, 4:, 4:])


def test_gaussian_target_grids():
    # "center": pixel (i, j) sits at (j + 0.5, i + 0.5); a point at a pixel centre peaks there
    t = gaussian_targets(torch.tensor([[10.5, 20.5]]), 32, 3.0, "center")
    assert t.shape == (1, 32, 32)
    assert t[0, 20, 10] == 1.0 and t.argmax() == 20 * 32 + 10
    assert torch.isclose(t[0, 20, 13], torch.exp(torch.tensor(-9 / 18)))
    # "index" (official): pixel (i, j) sits at (j, i); the same point is half a pixel off every grid
    # point, so the four pixels (20..21, 10..11) tie at exp(-0.5 / 18)
    t = gaussian_targets(torch.tensor([[10.5, 20.5]]), 32, 3.0)
    peak = torch.exp(torch.tensor(-0.5 / 18))
    torch.testing.assert_close(t[0, 20:22, 10:12], peak.expand(2, 2))
    assert t[0, 20, 10] == t.max() and FitConfig().gaussian_grid == "index"
    assert gaussian_targets(torch.tensor([[3.0, 7.0]]), 16, 2.0)[0, 7, 3] == 1.0


def test_model_frame_round_trip_and_letterbox():
    f = ModelFrame(200, 100, 512)
    p = torch.tensor([[50.0, 25.0]])
    torch.testing.assert_close(f.to_model(p), torch.tensor([[128.0, 128.0]]))
    torch.testing.assert_close(f.to_original(f.to_model(p)), p)
    lb = ModelFrame(200, 100, 512, "letterbox")
    assert lb.content_wh == (512, 256)
    img = lb.image(torch.full((3, 100, 200), 255, dtype=torch.uint8))
    assert (
        img.shape == (1, 3, 512, 512) and img[0, :, :256].min() == 1 and img[0, :, 256:].max() == 0
    )
    with pytest.raises(ValueError, match="method.resize"):
        ModelFrame(1, 1, 512, "crop")


def test_model_frame_resizes_like_the_official_pil_loader():
    # the official loaders: torchvision Resize((512, 512)) of the PIL image, then ToTensor
    from PIL import Image
    from torchvision import transforms

    g = torch.Generator().manual_seed(0)
    u8 = torch.randint(0, 256, (3, 75, 130), dtype=torch.uint8, generator=g)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    official = transforms.ToTensor()(transforms.Resize((128, 128))(pil))
    assert torch.equal(ModelFrame(130, 75, 128).image(u8)[0], official)
    # not the float antialiased resize sdzero used before (differs by up to 1/255)
    smooth = F.interpolate(u8[None].float() / 255, size=(128, 128), mode="bilinear", antialias=True)
    assert (smooth[0] - official).abs().max() > 0.5 / 255


# ------------------------------------------------------------------------------------- readout


def test_readout_is_softmax_per_layer_then_mean_then_argmax_plus_half():
    maps = torch.zeros(1, 2, 2, 8, 8)
    maps[0, :, 0, 3, 5] = 1.0  # layer 0 peaks at (x=5, y=3)
    maps[0, :, 1, 3, 5] = 0.6
    maps[0, :, 1, 6, 1] = 0.7  # layer 1 prefers (1, 6) slightly
    pred = PromptCorrespondence.readout(maps)
    manual = maps.mean(1).reshape(1, 2, 64).softmax(-1).mean(1).argmax(-1)
    assert manual.item() == 3 * 8 + 5
    assert pred.tolist() == [[5.5, 3.5]]


# -------------------------------------------------------------------- one step vs a reference


def _reference_maps(sd, latents, noise, cond, t, layers, heads, token, out):
    """An independent computation: hooks on to_q/to_k, explicit softmax(q k^T * scale)."""
    names = [cross_attention_layers(sd.unet)[i] for i in layers]
    qk = {}
    hooks = []
    for name in names:
        attn = sd.unet.get_submodule(name)
        hooks.append(
            attn.to_q.register_forward_hook(lambda m, i, o, n=name: qk.__setitem__((n, "q"), o))
        )
        hooks.append(
            attn.to_k.register_forward_hook(lambda m, i, o, n=name: qk.__setitem__((n, "k"), o))
        )
    abar = sd.scheduler.alphas_cumprod[t]
    noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    sd.unet(noisy, t, encoder_hidden_states=cond)
    for h in hooks:
        h.remove()
    maps = []
    for name in names:
        attn = sd.unet.get_submodule(name)
        q, k = qk[(name, "q")], qk[(name, "k")]
        b, n, c = q.shape
        d = c // attn.heads
        q = q.reshape(b, n, attn.heads, d).transpose(1, 2)
        k = k.reshape(b, -1, attn.heads, d).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) * d**-0.5).softmax(-1)[:, heads, :, token].mean(1)
        side = int(n**0.5)
        maps.append(F.interpolate(probs.reshape(b, 1, side, side), size=out, mode="bilinear"))
    return torch.cat(maps, 1)


def test_step_maps_equal_an_independent_reference(sd):
    pc = PromptCorrespondence(sd, _cfg())
    g = torch.Generator().manual_seed(1)
    latents = pc.encode_crops(_image(), [(0, 0, 118), (10, 5, 118)])
    noise = torch.rand(latents.shape, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ours = pc.step_maps(latents, noise, cond, 140)
        ref = _reference_maps(sd, latents, noise, cond, 140, [7, 8, 9, 10], [4, 5, 6, 7], 1, S)
    assert ours.shape == (2, 4, S, S)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------ batching and seeds


def test_batched_optimisation_equals_one_at_a_time(sd):
    src, trg = _image(0), _image(1)
    points = torch.tensor([[30.0, 40.0], [90.0, 100.0]])
    batched = PromptCorrespondence(sd, _cfg(batch_size=0, steps=2))
    single = PromptCorrespondence(sd, _cfg(batch_size=1, steps=2))
    items = [(p, e) for p in range(2) for e in range(2)]
    gens = [item_generator(0, 3, p, e) for p, e in items]
    cond_b = batched.optimise(src, points[[p for p, _ in items]], gens)
    conds = []
    for p, e in items:
        conds.append(single.optimise(src, points[[p]], [item_generator(0, 3, p, e)]))
    torch.testing.assert_close(cond_b, torch.cat(conds), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(conds[0], conds[1])  # restarts differ
    assert (
        batched.match(src, trg, points, seed=0, index=3).tolist()
        == single.match(src, trg, points, seed=0, index=3).tolist()
    )


def test_same_seed_same_prediction_and_frozen_backbone(sd):
    before = {k: v.clone() for k, v in sd.state_dict().items()}
    pc = PromptCorrespondence(sd, _cfg(num_embeddings=1))
    src, trg = _image(0), _image(2)
    pts = torch.tensor([[20.0, 100.0]])
    a = pc.match(src, trg, pts, seed=5)
    b = pc.match(src, trg, pts, seed=5)
    assert torch.equal(a, b)
    after = sd.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in sd.parameters())


def test_optimisation_lowers_the_loss(sd):
    """Adam on the Gaussian target lowers the per-item loss on a fixed crop and noise."""
    pc = PromptCorrespondence(sd, _cfg(steps=25, lr=0.2))
    img = _image(0)
    box = (5, 5, crop_size(S, 0.9317))
    latents = pc.encode_crops(img, [box])
    noise = torch.rand(latents.shape, generator=torch.Generator().manual_seed(0))
    target = gaussian_targets(to_crop_frame(torch.tensor([[40.0, 60.0]]), box, S), S, pc.sigma)
    cond = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    opt = torch.optim.Adam([cond], lr=0.2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = pc.step_loss(pc.step_maps(latents, noise, cond, 140), target)
        loss.sum().backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5])  # fixed inputs: descent must make progress
    assert min(losses) < losses[0]


def test_config_validation():
    with pytest.raises(ValueError, match="multiple of 64"):
        FitConfig(image_size=100)
    with pytest.raises(ValueError, match="method.noise"):
        FitConfig(noise="pink")
    with pytest.raises(ValueError, match="inference_crops"):
        FitConfig(inference_crops=3)


def test_pck_threshold_sizes_in_both_frames_including_the_cub_quirk():
    from sdzero.correspondence.module import CorrespondenceSettings
    from sdzero.tasks.correspondence import CorrespondenceTask

    batch = {
        "trg_kps": torch.tensor([[30.0, 20.0], [40.0, 90.0]]),
        "src_bbox": torch.tensor([0.0, 0.0, 50.0, 50.0]),
        "trg_bbox": torch.tensor([20.0, 10.0, 40.0, 90.0]),  # 20 wide, 80 high
        "src_size": (100, 100),
        "trg_size": (200, 100),  # stretched to 512: x scale 2.56, y scale 5.12
    }

    def size(**kw):
        scoring = CorrespondenceSettings(**kw).scoring()
        return CorrespondenceTask(scoring, ["cat"]).threshold_size(batch)

    assert size(pck_threshold="bbox-target") == pytest.approx(80.0)
    assert size(pck_threshold="bbox-target", pck_frame="resized") == pytest.approx(80 * 5.12)
    assert size(pck_threshold="bbox-target-xscale", pck_frame="resized") == pytest.approx(80 * 2.56)
    assert size(pck_threshold="bbox-source", pck_frame="resized") == pytest.approx(50 * 5.12)
    assert size(pck_threshold="image") == pytest.approx(200.0)
    with pytest.raises(ValueError, match="pck_frame=resized only"):
        size(pck_threshold="bbox-target-xscale")
