"""Exact speed levers and the speed options of the correspondence loop, on the tiny backbone.

Exact levers (latent cache, truncation under gradient checkpointing) must not change the result
beyond float rounding; the options must change what they claim and nothing else."""

import pytest
import torch
import torch.nn.functional as F

from sdzero.correspondence.early_stop import EarlyStop
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence, item_generator
from sdzero.correspondence.latent_cache import LatentCache

S = 128


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=S, mode="bilinear")


def _cfg(**kw):
    base = dict(image_size=S, steps=4, num_embeddings=2, inference_crops=5, lr=0.05)
    return FitConfig(**{**base, **kw})


def _fit(sd, points=((40.0, 50.0), (90.0, 70.0)), embeddings=2, **kw):
    pc = PromptCorrespondence(sd, _cfg(num_embeddings=embeddings, **kw))
    items = [(p, j) for p in range(len(points)) for j in range(embeddings)]
    gens = [item_generator(0, 0, p, j) for p, j in items]
    pts = torch.tensor([points[p] for p, _ in items])
    cond = pc.optimise(_image(0), pts, gens, groups=[p for p, _ in items])
    return pc, cond


def test_latent_cache_encodes_each_distinct_box_once_and_equals_fresh_encodes(sd):
    pc = PromptCorrespondence(sd, _cfg())
    image = _image(3)
    cache = pc.latent_cache(image)
    boxes = [(0, 0, 119), (9, 9, 119), (0, 0, 119), (3, 5, 119)]
    got = cache(boxes)
    assert (cache.misses, cache.hits) == (3, 1)
    again = cache([(9, 9, 119), (3, 5, 119)])
    assert (cache.misses, cache.hits) == (3, 3)
    fresh = torch.cat([pc.encode_crops(image, [b]) for b in boxes])
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, fresh[[1, 3]], atol=1e-5, rtol=1e-5)
    off = LatentCache(lambda b: pc.encode_crops(image, b), enabled=False)
    off(boxes)
    off(boxes)
    assert (off.misses, off.hits) == (6, 2)  # within a call still deduplicated


def test_exact_mode_equals_the_straightforward_path(sd):
    """Defaults (truncated UNet, latent cache) against the full UNet encoding every crop: the fitted
    tensors, the inference maps and the predictions agree to float rounding."""
    pts = torch.tensor([[40.0, 50.0], [90.0, 70.0]])
    gens = lambda: [item_generator(0, 0, p, 0) for p in range(2)]  # noqa: E731
    out = {}
    for name, kw in {"exact": {}, "straight": dict(truncate=False, cache_latents=False)}.items():
        pc = PromptCorrespondence(sd, _cfg(num_embeddings=1, **kw))
        g = gens()
        cond = pc.optimise(_image(0), pts, g)
        out[name] = (cond, pc.infer(_image(1), cond, g), pc.match(_image(0), _image(1), pts, 0))
    for exact, straight in zip(out["exact"], out["straight"], strict=True):
        torch.testing.assert_close(exact, straight, atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_with_truncation_gives_the_same_fit(sd):
    _, plain = _fit(sd)
    pc, ckpt = _fit(sd, checkpointing=True)
    assert sd.unet.is_gradient_checkpointing
    torch.testing.assert_close(ckpt, plain, atol=1e-5, rtol=1e-5)
    PromptCorrespondence(sd, _cfg()).optimise(
        _image(0), torch.tensor([[40.0, 50.0]]), [item_generator(0, 0, 0, 0)]
    )
    assert not sd.unet.is_gradient_checkpointing  # the next plain fit switches it back off


def test_bf16_autocast_changes_maps_by_rounding_only(sd):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, S // 8, S // 8, generator=g)
    noise = torch.rand(2, 4, S // 8, S // 8, generator=g)
    cond = torch.randn(2, 77, sd.unet.config.cross_attention_dim, generator=g)
    exact = PromptCorrespondence(sd, _cfg()).step_maps(latents, noise, cond, 140)
    half = PromptCorrespondence(sd, _cfg(autocast="bf16")).step_maps(latents, noise, cond, 140)
    assert half.dtype == torch.float32
    diff = (half - exact).abs().max().item()
    assert 0 < diff < 0.05 * exact.abs().max().item()
    _, cond_bf16 = _fit(sd, autocast="bf16")
    assert cond_bf16.dtype == torch.float32 and torch.isfinite(cond_bf16).all()


def test_shared_crop_draws_one_crop_per_query_point_per_step(sd):
    pc = PromptCorrespondence(sd, _cfg(shared_crop=True))
    gens = [item_generator(0, 0, p, j) for p in range(2) for j in range(3)]
    pts = torch.tensor([[40.0, 50.0]] * 3 + [[90.0, 70.0]] * 3)
    boxes = pc.draw_boxes(pts, gens, groups=[0, 0, 0, 1, 1, 1])
    assert boxes[0] == boxes[1] == boxes[2] and boxes[3] == boxes[4] == boxes[5]
    own = [item_generator(0, 0, p, j) for p in range(2) for j in range(3)]
    assert boxes[0] == pc.draw_boxes(pts[:1], own[:1])[0]  # the group's first item draws it
    # every step then encodes one crop per query point
    calls = []
    cache = pc.latent_cache(_image(0))
    encode = cache.encode
    cache.encode = lambda b: calls.append(len(b)) or encode(b)
    cache.enabled = False
    pc.optimise(_image(0), pts, gens, groups=[0, 0, 0, 1, 1, 1], latents=cache)
    assert calls == [2] * pc.cfg.steps


def test_early_stop_rule():
    stop = EarlyStop(2, patience=3, delta=0.1)
    for step in range(10):
        stop.update(stop.active(), torch.tensor([1.0, 0.5**step])[stop.active()])
    # item 0 (flat loss) stops after 3 steps without improvement; item 1 keeps improving
    assert stop.active() == [1]
    assert stop.steps.tolist() == [4, 10]
    assert EarlyStop(3, patience=0, delta=0.1).active() == [0, 1, 2]


def test_an_early_stopped_item_keeps_the_tensor_it_had_when_it_stopped(sd):
    pc, cond = _fit(sd, embeddings=1, steps=12, early_stop_patience=2, early_stop_delta=0.5)
    taken = pc.steps_taken.tolist()
    assert all(1 <= t <= 12 for t in taken) and min(taken) < 12
    for i, t in enumerate(taken):
        ref_pc = PromptCorrespondence(sd, _cfg(num_embeddings=1, steps=t))
        point = [[40.0, 50.0], [90.0, 70.0]][i]
        ref = ref_pc.optimise(_image(0), torch.tensor([point]), [item_generator(0, 0, i, 0)])
        torch.testing.assert_close(cond[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_option_validation():
    with pytest.raises(ValueError, match="method.autocast"):
        FitConfig(autocast="int8")
    with pytest.raises(ValueError, match="early_stop"):
        FitConfig(early_stop_patience=-1)
