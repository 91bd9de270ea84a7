"""How the fitting loop's crops become latents: the exact levers (channels-last convolutions, the
replayed crop plan, up-front encodes) change nothing beyond float rounding; the crop-encoder
options (bf16 VAE, TAESD) change the latents and say so. Tiny random backbone."""

import pytest
import torch
import torch.nn.functional as F

from sdzero.backbones.errors import WeightsNotFoundError
from sdzero.backbones.tiny_autoencoder import TinyAutoencoder, load_tiny_autoencoder
from sdzero.correspondence import crop_plan
from sdzero.correspondence.crop_encoder import TinyCrops, VaeCrops
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence, item_generator
from sdzero.correspondence.module import PromptCorrespondenceModule, prepare_backbone

S = 128
POINTS = torch.tensor([[40.0, 50.0], [90.0, 70.0]])


def _image(seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 16, 16, generator=g), size=S, mode="bilinear")


def _cfg(**kw):
    base = dict(image_size=S, steps=3, num_embeddings=2, inference_crops=6, lr=0.05)
    return FitConfig(**{**base, **kw})


def _items(embeddings=2):
    items = [(p, j) for p in range(len(POINTS)) for j in range(embeddings)]
    gens = [item_generator(0, 7, p, j) for p, j in items]
    return POINTS[[p for p, _ in items]], gens, [p for p, _ in items]


def _recording(pc, image):
    """A latent cache of ``image`` that records every box it is asked for."""
    cache = pc.latent_cache(image)
    asked = []
    real = cache.__call__

    class Spy:
        def __call__(self, boxes):
            asked.extend(boxes)
            return real(boxes)

    return cache, Spy(), asked


def test_channels_last_gives_the_nchw_fit_and_predictions(sd):
    out = {}
    for channels_last in (False, True):
        prepare_backbone(sd, _cfg(channels_last=channels_last))
        conv = sd.vae.encoder.conv_in.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) == channels_last
        pc = PromptCorrespondence(sd, _cfg(num_embeddings=1, inference_crops=5))
        out[channels_last] = pc.match(_image(0), _image(1), POINTS, seed=0, index=3)
        latents = pc.encode_crops(_image(0), [(0, 0, pc.crop)])
        out[f"lat{channels_last}"] = latents
    prepare_backbone(sd, _cfg(channels_last=False))
    torch.testing.assert_close(out["latTrue"], out["latFalse"], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[True], out[False])


def test_fit_boxes_are_the_boxes_the_fit_draws(sd):
    for kw in ({}, {"shared_crop": True}):
        pc = PromptCorrespondence(sd, _cfg(**kw))
        points, gens, groups = _items()
        planned = crop_plan.fit_boxes(pc, points, gens, groups)
        cache, spy, asked = _recording(pc, _image(0))
        pc.optimise(_image(0), points, gens, groups=groups, latents=spy)
        assert asked == planned and len(planned) == pc.cfg.steps * len(gens)
        assert len(set(planned)) > 1


def test_inference_boxes_replay_the_inference_stream_for_a_fixed_peak(sd, monkeypatch):
    pc = PromptCorrespondence(sd, _cfg())
    points, gens, groups = _items()
    peaks = torch.tensor([[60.5, 64.5]] * len(gens))
    planned = crop_plan.inference_boxes(pc, points, peaks, gens)
    cond = pc.optimise(_image(0), points, gens, groups=groups)  # advances the streams
    real = pc.draw_boxes
    monkeypatch.setattr(pc, "draw_boxes", lambda pts, g, groups=None: real(peaks, g, groups))
    cache, spy, asked = _recording(pc, _image(1))
    pc.infer(_image(1), cond, gens, latents=spy)
    assert asked == planned
    assert planned[: 4 * len(gens)] == [b for b in pc_corners(pc) for _ in gens]


def pc_corners(pc):
    from sdzero.correspondence.crops import corner_crops

    return corner_crops(pc.size, pc.crop)


def test_prefetched_crops_are_the_fit_crops_and_the_predictions_do_not_move(sd):
    pc = PromptCorrespondence(sd, _cfg())
    points, gens, groups = _items()
    cache = pc.latent_cache(_image(0))
    calls = []
    encode = cache.encode
    cache.encode = lambda b: calls.append(len(b)) or encode(b)
    cache.prefetch(crop_plan.fit_boxes(pc, points, gens, groups), batch=4)
    distinct = cache.misses
    assert calls[:-1] == [4] * (len(calls) - 1) and sum(calls) == distinct
    pc.optimise(_image(0), points, gens, groups=groups, latents=cache)
    assert cache.misses == distinct and len(calls) == -(-distinct // 4)  # no encode afterwards
    one = dict(num_embeddings=1, inference_crops=4)
    plain = PromptCorrespondence(sd, _cfg(**one)).match(_image(0), _image(1), POINTS, seed=0)
    ahead = PromptCorrespondence(sd, _cfg(prefetch_batch=4, **one)).match(
        _image(0), _image(1), POINTS, seed=0
    )
    assert torch.equal(plain, ahead)
    with pytest.raises(ValueError, match="cache_latents"):
        PromptCorrespondence(sd, _cfg(cache_latents=False)).latent_cache(_image(0)).prefetch([], 2)


def test_bf16_vae_moves_the_latents_by_bf16_rounding_only(sd):
    crops = _image(0)
    exact = VaeCrops(sd)(crops)
    half = VaeCrops(sd, torch.bfloat16)(crops)
    assert half.dtype == torch.float32
    rel = ((half - exact).abs().max() / exact.abs().max()).item()
    assert 0 < rel < 0.05
    pc = PromptCorrespondence(sd, _cfg(crop_encoder="vae_bf16"))
    torch.testing.assert_close(pc.encode_crops(crops, [(0, 0, S)]), half)


def test_taesd_architecture_loads_like_other_weights(tmp_path, capsys):
    tiny = load_tiny_autoencoder(None, channels=8)
    assert tiny.random_weights and "RANDOM" in capsys.readouterr().err
    x = _image(2)
    latents = tiny.encode_images(x)
    assert latents.shape == (1, 4, S // 8, S // 8) and torch.isfinite(latents).all()
    tiny.model.save_pretrained(tmp_path / "taesd")
    again = load_tiny_autoencoder(str(tmp_path / "taesd"))
    assert not again.random_weights
    assert torch.equal(again.encode_images(x), latents)
    # TAESD proper: 64 channels; a 512 px encode is ~9x fewer FLOPs than the SD VAE's encoder
    full = load_tiny_autoencoder(None)
    assert sum(p.numel() for p in full.model.encoder.parameters()) == 1_222_532
    with pytest.raises(WeightsNotFoundError, match="taesd_weights"):
        load_tiny_autoencoder(str(tmp_path / "nowhere" / "taesd.safetensors"))


def test_taesd_crop_encoder_in_the_method_and_the_module(sd):
    tiny = load_tiny_autoencoder(None, channels=8)
    pc = PromptCorrespondence(sd, _cfg(crop_encoder="taesd"))
    pc.crop_encoder = TinyCrops(sd, tiny)
    box = (3, 5, pc.crop)
    got = pc.encode_crops(_image(0), [box])
    crop = F.interpolate(_image(0)[..., 5 : 5 + pc.crop, 3 : 3 + pc.crop], size=S, mode="bilinear")
    torch.testing.assert_close(got, tiny.encode_images(crop.clamp(0, 1)))
    assert not torch.allclose(got, VaeCrops(sd)(crop.clamp(0, 1)))
    module = PromptCorrespondenceModule(
        {"weights": None, "arch": "tiny"}, crop_encoder="taesd", taesd_weights=None, image_size=S
    )
    module.setup("test")
    assert isinstance(module.taesd, TinyAutoencoder) and module.random_weights
    assert module.method.crop_encoder.tiny is module.taesd
    with pytest.raises(ValueError, match="method.crop_encoder"):
        FitConfig(crop_encoder="jpeg")
