"""Batched OVDiff work equals the one-at-a-time path: sliding windows per extractor forward call,
and support images per sampling pipeline call (tiny random models, CPU)."""

import pytest
import torch
from diffusers import StableDiffusionPipeline

from sdzero.backbones.sd import load_stable_diffusion
from sdzero.seeding import keyed_generator
from sdzero.segmentation.features import ColourExtractor, SDQueryExtractor, build_extractor
from sdzero.segmentation.inference import PrototypeBank, Segmenter, sliding_windows
from sdzero.segmentation.module import OVDiffModule
from sdzero.segmentation.prototypes import Prototypes
from sdzero.segmentation.support import sample_support_set

# A 96x128 working frame: 96² windows (1 x 2), 64² windows (2 x 3), then the full image.
WINDOWS = {"window_sizes": (96, 64), "stride": 32, "short_side": 96}


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(None, "tiny", text_encoder=True)


def random_prototypes(name, extractor, dim, seed, rows=5):
    gen = torch.Generator().manual_seed(seed)
    region = torch.ones(rows, 2, 2, dtype=torch.bool)
    return Prototypes(
        class_name=name,
        extractor=extractor,
        fg=torch.randn(rows, dim, generator=gen),
        bg=torch.randn(rows, dim, generator=gen),
        fg_kind=torch.ones(rows, dtype=torch.int8),
        bg_kind=torch.ones(rows, dtype=torch.int8),
        fg_image=torch.arange(rows),
        bg_image=torch.arange(rows),
        fg_region=region,
        bg_region=region.clone(),
        support=[f"support #{i}" for i in range(rows)],
    )


def bank(extractor):
    protos = {c: random_prototypes(f"c{c}", extractor.name, extractor.dim, c) for c in (1, 2, 3)}
    return PrototypeBank.build(protos, stuff_threshold=0)


def image(seed=0):
    """(3, 120, 160) uint8: smooth random colour blobs (resized to 96x128 by the segmenter)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, 6, 8, generator=gen)
    up = torch.nn.functional.interpolate(low, size=(120, 160), mode="bicubic").clamp(0, 1)
    return (up[0] * 255).round().byte()


def record_batches(extractor):
    """The input shapes of every forward call of ``extractor``, appended as they happen."""
    shapes = []
    extractor.register_forward_pre_hook(lambda _, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_window_grid_of_the_test_frame():
    windows = sliding_windows(96, 128, WINDOWS["window_sizes"], WINDOWS["stride"])
    sizes = [w.size for w in windows]
    assert sizes == [(96, 96)] * 2 + [(64, 64)] * 6 + [(96, 128)]


def test_colour_windows_batched_by_prepared_shape_equal_one_at_a_time():
    colour = ColourExtractor()
    shapes = record_batches(colour)
    segmenters = {
        b: Segmenter([colour], [bank(colour)], 4, **WINDOWS, window_batch=b) for b in (1, 4)
    }
    single = segmenters[1](image(), explain=True)
    assert [s[0] for s in shapes] == [1] * 9
    shapes.clear()
    batched = segmenters[4](image(), explain=True)
    # 96² windows together, 64² ones in chunks of 4 + 2, the full image alone.
    assert shapes == [(2, 3, 96, 96), (4, 3, 64, 64), (2, 3, 64, 64), (1, 3, 96, 128)]
    assert (batched.scores - single.scores).abs().max() <= 1e-6
    assert torch.equal(batched.labels, single.labels)
    # Explanation pairs in the same (extractor, window) order, same maps.
    assert [p.window for p in batched.pairs] == [p.window for p in single.pairs]
    for a, b in zip(batched.pairs, single.pairs, strict=True):
        assert (a.values - b.values).abs().max() <= 1e-6


def test_model_extractors_batched_equal_one_at_a_time(sd):
    # SD queries at 64² input (every window prepared to 64²: one group of 9, chunks 4 + 4 + 1),
    # tiny DINO (windows keep their size) and tiny CLIP (448²).
    extractors = [
        SDQueryExtractor(sd, input_size=64),
        build_extractor("dino:tiny_vit8", vit_weights="random"),
        build_extractor("clip:tiny_clip16", vit_weights="random"),
    ]
    sd_shapes = record_batches(extractors[0])
    banks = [bank(e) for e in extractors]
    single = Segmenter(extractors, banks, 4, **WINDOWS, window_batch=1)(image(1))
    assert len(sd_shapes) == 9
    sd_shapes.clear()
    batched = Segmenter(extractors, banks, 4, **WINDOWS, window_batch=4)(image(1))
    assert [s[0] for s in sd_shapes] == [4, 4, 1]
    # Every window keeps its own VAE-sample and noise draw: a shared or batch-wide draw would
    # move the scores by far more than float rounding.
    diff = (batched.scores - single.scores).abs().max()
    assert diff <= 1e-5, diff
    assert torch.equal(batched.labels, single.labels)
    assert single.scores.abs().max() > 0.01  # the comparison is not between two empty canvases


def test_sd_window_noise_is_fresh_per_window_and_image_and_reproducible(sd):
    extractor = SDQueryExtractor(sd, input_size=64)
    window = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    two = window.expand(2, -1, -1, -1)
    feats = extractor.window_features(two, [(0, 0), (0, 1)])
    # The same pixels in two windows get distinct VAE-sample and noise draws...
    assert (feats[0] - feats[1]).abs().max() > 1e-2
    # ...each the stream keyed (seed 43, image index, window index), whatever the batch.
    keyed = extractor(window, generators=[keyed_generator(43, 0, 1)])
    assert torch.allclose(feats[1:], keyed, atol=1e-5)
    assert torch.allclose(extractor.window_features(window, [(0, 1)]), keyed, atol=1e-5)
    assert (extractor.window_features(window, [(5, 1)]) - keyed).abs().max() > 1e-2
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        extractor(two, generators=[keyed_generator(43, 0, 0)])
    # In the segmenter the image index keys the draws: reruns agree, other indices differ.
    segment = Segmenter([extractor], [bank(extractor)], 4, **WINDOWS)
    first, again = segment(image(2), image_index=4), segment(image(2), image_index=4)
    assert torch.equal(first.scores, again.scores)
    assert (segment(image(2), image_index=5).scores - first.scores).abs().max() > 1e-3


def test_support_noise_repeats_the_vae_epsilon_window_noise_does_not(sd, monkeypatch):
    # Officially (gen_proto_sd.py) the noise generator is re-seeded 43 after the VAE sample, so
    # x_t = sqrt(abar) z + sqrt(1 - abar) eps with z = scale * (mean + std * eps), the same eps.
    extractor = SDQueryExtractor(sd, input_size=64)
    captured = []
    add_noise = sd.add_noise
    monkeypatch.setattr(
        sd, "add_noise", lambda z, t, n: captured.append((z, n)) or add_noise(z, t, n)
    )
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    extractor(images)
    extractor.window_features(images, [(0, 0), (0, 1)])
    with torch.no_grad():
        posterior = sd.vae.encode(images * 2 - 1).latent_dist
    scale = sd.vae.config.scaling_factor
    for (latents, noise), support in zip(captured, (True, False), strict=True):
        eps = (latents / scale - posterior.mean) / posterior.std
        assert torch.allclose(eps, noise, atol=1e-4) == support
    want = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(43))
    assert torch.equal(captured[0][1], torch.cat([want, want]))


def test_window_batch_must_be_positive():
    colour = ColourExtractor()
    with pytest.raises(ValueError, match="window_batch must be >= 1, got 0"):
        Segmenter([colour], [bank(colour)], 4, window_batch=0)
    for key in ("window_batch", "sample_batch"):
        with pytest.raises(ValueError, match=f"method.{key} must be >= 1, got 0"):
            OVDiffModule({"arch": "tiny"}, **{key: 0})


# A 72 px support image has a 9x9 latent: 324 values, not a multiple of 16, so a batched
# torch.randn would not give the per-image draws (torch's CPU normal fill works in blocks of 16).
SUPPORT = {"num_support": 3, "steps": 2, "size": 72, "seed": 5}


def test_support_sampling_batched_equals_one_at_a_time(sd, monkeypatch):
    initial = []
    original = StableDiffusionPipeline.__call__

    def spy(pipe, *args, **kwargs):
        initial.append(kwargs["latents"])
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", spy)
    single = sample_support_set(sd, "cat", **SUPPORT, batch_size=1)
    # Image i starts from the i-th (1, 4, 9, 9) draw of the generator seeded `seed`: the draws
    # the pipeline itself made with batch_size=1 before per-image latents were passed in.
    gen = torch.Generator().manual_seed(SUPPORT["seed"])
    expected = [torch.randn(1, 4, 9, 9, generator=gen) for _ in range(3)]
    assert [x.shape[0] for x in initial] == [1, 1, 1]
    assert all(torch.equal(a, b) for a, b in zip(initial, expected, strict=True))
    initial.clear()
    batched = sample_support_set(sd, "cat", **SUPPORT, batch_size=2)
    assert [x.shape[0] for x in initial] == [2, 1]
    assert torch.equal(torch.cat(initial), torch.cat(expected))
    # PNG-quantised images: at most one level apart (a value may sit on a rounding boundary).
    assert (batched.images - single.images).abs().max() <= 1 / 255 + 1e-6
    assert (batched.images != single.images).float().mean() < 0.01
    assert (batched.attribution - single.attribution).abs().max() <= 1e-4
    # Distinct images: per-image draws, not one draw repeated.
    assert (single.images[0] - single.images[1]).abs().max() > 0.05
