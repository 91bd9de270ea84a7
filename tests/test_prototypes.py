"""Feature extractors, prototypes on constructed features, and the prototype cache."""

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.synthetic_segmentation import CATALOGUE, write_synthetic_voc
from sdzero.backbones.attention import resolve_layers
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.segmentation.features import SD_LAYERS, ColourExtractor, build_extractor, resize
from sdzero.segmentation.prototypes import (
    CLASS_MEAN,
    IMAGE_MEAN,
    KMEANS_CENTRE,
    PrototypeCache,
    Prototypes,
    build_prototypes,
    masks_to_grid,
    prototypes_from_features,
)
from sdzero.segmentation.support import FolderSupport, load_support_folder

# --- extractors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd():
    return load_stable_diffusion(None, "tiny", text_encoder=True)


def test_sd_queries_dim_layout_and_truncation(sd):
    extractor = build_extractor("sd", sd=sd)
    paths = resolve_layers(sd.unet, SD_LAYERS)
    widths = [sd.unet.get_submodule(p).to_q.out_features for p in paths]
    assert extractor.dim == sum(widths) == 416  # tiny: 32 + 64 + 3*64 + 3*32 + 32
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    feats = extractor(images)
    assert feats.shape == (2, 416, 8, 8) and feats.dtype == torch.float32
    # Stopping after layer 15 changes nothing: same queries as the full UNet pass.
    assert torch.equal(feats, extractor(images, truncate=False))
    # Layer 6 (mid block, 1x1 grid at 64 px) is upsampled to a constant map, in concat order.
    mid = feats[:, widths[0] : widths[0] + widths[1]]
    assert torch.allclose(mid, mid[..., :1, :1].expand_as(mid))
    assert not torch.allclose(feats[:, :32], feats[:, :32, :1, :1].expand(-1, -1, 8, 8))
    # Each image has its own seeded noise: features do not depend on the batch.
    assert torch.allclose(extractor(images[1:]), feats[1:], atol=1e-4)
    assert extractor.prepare(torch.rand(1, 3, 30, 50)).shape == (1, 3, 512, 512)


def test_vit_extractors_prepare_and_reproducible_random_weights():
    dino = build_extractor("dino:tiny_vit8", vit_weights="random")
    clip = build_extractor("clip:tiny_clip16", vit_weights="random")
    images = torch.rand(1, 3, 64, 64)
    assert dino(images).shape == (1, dino.dim, 8, 8) and clip(images).shape == (1, clip.dim, 4, 4)
    again = build_extractor("dino:tiny_vit8", vit_weights="random")
    assert torch.equal(again(images), dino(images))
    assert dino.prepare(torch.rand(1, 3, 100, 130)).shape == (1, 3, 100, 130)  # <= 448: kept
    assert dino.prepare(torch.rand(1, 3, 448, 1000)).shape == (1, 3, 358, 800)  # long side <= 800
    assert clip.prepare(torch.rand(1, 3, 100, 130)).shape == (1, 3, 448, 448)
    assert dino.settings["model"] == "tiny_vit8" and dino.name == "dino:tiny_vit8"


def test_window_resizes_are_bilinear_without_antialias(sd):
    # Known answer: rows with one bright pixel, shrunk 8 -> 2: bilinear without antialias samples
    # x = 1.5 and 5.5 only (a pixel at x = 1 gives [0.5, 0], one at x = 3 nothing).
    row = torch.zeros(2, 3, 1, 8)
    row[0, ..., 1] = row[1, ..., 3] = 1.0
    out = resize(row, (1, 2))[:, 0, 0]
    assert torch.equal(out, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    window = torch.rand(1, 3, 600, 500, generator=torch.Generator().manual_seed(0))
    official = {
        size: F.interpolate(window, size=(size, size), mode="bilinear", align_corners=False)
        for size in (512, 448)
    }
    assert torch.equal(build_extractor("sd", sd=sd).prepare(window), official[512])
    clip = build_extractor("clip:tiny_clip16", vit_weights="random")
    assert torch.equal(clip.prepare(window), official[448])
    # DINO: short side 500 > 448 -> 448, long int(448 * 600 / 500) = 537 (<= 800)
    dino = build_extractor("dino:tiny_vit8", vit_weights="random")
    expected = F.interpolate(window, size=(537, 448), mode="bilinear", align_corners=False)
    assert torch.equal(dino.prepare(window), expected)


def test_build_extractor_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown feature extractor 'mae'"):
        build_extractor("mae")
    with pytest.raises(ValueError, match="pass sd="):
        build_extractor("sd")


def test_colour_extractor_known_answer():
    image = torch.zeros(1, 3, 16, 8)
    image[:, :, :8] = torch.tensor([1.0, 0.5, 0.0])[:, None, None]  # top patch: flat orange
    image[:, 0, 8:] = (torch.arange(8) % 2).float()  # bottom patch: red stripes 0/1
    feats = ColourExtractor()(image)
    assert feats.shape == (1, 7, 2, 1)
    assert torch.allclose(feats[0, :, 0, 0], torch.tensor([1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.5]))
    assert torch.allclose(feats[0, :, 1, 0], torch.tensor([0.0, -1.0, -1.0, 0.5, 0.0, 0.0, 0.5]))


# --- prototypes on constructed features --------------------------------------------------------


def test_masks_to_grid_counts_the_centre_pixels_of_each_block():
    masks = torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 4:6] = True  # exactly cell (1, 2)
    masks[0, 7, 1] = True  # one pixel of cell (3, 0); with 2x2 blocks every pixel is central
    expected = torch.zeros(1, 4, 4, dtype=torch.bool)
    expected[0, 1, 2] = expected[0, 3, 0] = True
    assert torch.equal(masks_to_grid(masks, (4, 4)), expected)
    # 8x8 blocks: bilinear samples rows/columns 8i + 3.5, so only pixels 8i + 3 and 8i + 4 count.
    big = torch.zeros(2, 16, 16, dtype=torch.bool)
    big[0, :3, :3] = big[0, 5:8, 5:8] = True  # cell (0, 0) minus its centre: empty on the grid
    big[1, 4, 11] = True  # a centre pixel of cell (0, 1)
    grid = masks_to_grid(big, (2, 2))
    assert grid.flatten(1).tolist() == [[False] * 4, [False, True, False, False]]


def _constructed():
    """3 images, D=2, 4x4 grid (masks at 8x8, 2x2 blocks per cell).

    FG: image 0 has 6 cells at (1, 0), image 1 has 2 cells at (5, 5), image 2 none.
    BG: image 2's first row (4 cells) at (-3, 0), one of them NaN; image 0's last cell at (0, 9).
    """
    feats = torch.zeros(3, 2, 4, 4)
    fg = torch.zeros(3, 8, 8, dtype=torch.bool)
    bg = torch.zeros(3, 8, 8, dtype=torch.bool)
    feats[0, :, :2, :3] = torch.tensor([1.0, 0.0])[:, None, None]
    fg[0, :4, :6] = True
    feats[1, :, 3, 2:] = torch.tensor([5.0, 5.0])[:, None]
    fg[1, 6:, 4:] = True
    feats[2, :, 0, :] = torch.tensor([-3.0, 0.0])[:, None]
    feats[2, 1, 0, 3] = float("nan")
    bg[2, :2, :] = True
    feats[0, :, 3, 3] = torch.tensor([0.0, 9.0])
    bg[0, 6:, 6:] = True
    return feats, fg, bg


def test_prototypes_known_means_centres_and_bookkeeping():
    feats, fg, bg = _constructed()
    p = prototypes_from_features(feats, fg, bg, class_name="thing", extractor="x", kmeans_k=2)
    # FG: class mean over 8 pooled cells, image means of images 0 and 1, 2 k-means centres.
    assert p.fg_kind.tolist() == [CLASS_MEAN, IMAGE_MEAN, IMAGE_MEAN, KMEANS_CENTRE, KMEANS_CENTRE]
    assert torch.allclose(p.fg[0], torch.tensor([(6 * 1 + 2 * 5) / 8, 10 / 8]))
    assert torch.allclose(p.fg[1:3], torch.tensor([[1.0, 0.0], [5.0, 5.0]]))
    centres = p.fg[3:][p.fg[3:, 0].argsort()]
    assert torch.allclose(centres, torch.tensor([[1.0, 0.0], [5.0, 5.0]]))
    assert p.fg_image.tolist()[:3] == [0, 0, 1]  # class mean: the image with the largest mask
    grid_fg = masks_to_grid(fg, (4, 4))
    assert torch.equal(p.fg_region[0], grid_fg[0]) and torch.equal(p.fg_region[2], grid_fg[1])
    for row in (3, 4):  # each centre: the image holding its pixels, and exactly those pixels
        image = 0 if p.fg[row, 0] < 3 else 1
        assert p.fg_image[row] == image and torch.equal(p.fg_region[row], grid_fg[image])
    # BG: image 2 has no FG cell, so (officially) its background is skipped too: only image 0's
    # one cell at (0, 9) is pooled (k-means falls back to K = 1).
    assert p.bg_kind.tolist() == [CLASS_MEAN, IMAGE_MEAN, KMEANS_CENTRE]
    assert torch.equal(p.bg, torch.tensor([[0.0, 9.0]] * 3))
    assert p.bg_image.tolist() == [0, 0, 0] and p.bg_region.sum((1, 2)).tolist() == [1, 1, 1]
    assert p.support == ["support #0", "support #1", "support #2"]
    assert p.fg.dtype == torch.float32 and p.fg_region.shape == (5, 4, 4)


def test_prototypes_background_of_images_with_foreground_drops_nan_cells():
    feats, fg, bg = _constructed()
    fg[2, 6:, :2] = True  # image 2 now has one FG cell, (3, 0), at (7, 7)
    feats[2, :, 3, 0] = 7.0
    p = prototypes_from_features(feats, fg, bg, class_name="thing", extractor="x", kmeans_k=2)
    assert torch.allclose(p.fg[0], torch.tensor([(6 * 1 + 2 * 5 + 7) / 9, (10 + 7) / 9]))
    # BG: the NaN cell is dropped; image 2 keeps 3 cells at (-3, 0), image 0 one cell at (0, 9).
    assert p.bg_kind.tolist() == [CLASS_MEAN, IMAGE_MEAN, IMAGE_MEAN, KMEANS_CENTRE, KMEANS_CENTRE]
    assert torch.allclose(p.bg[0], torch.tensor([-9.0 / 4, 9.0 / 4]))
    assert torch.allclose(p.bg[1:3], torch.tensor([[0.0, 9.0], [-3.0, 0.0]]))
    assert p.bg_image.tolist()[:3] == [2, 0, 2]
    assert p.bg_region[0].sum() == 3 and not p.bg_region[0, 0, 3]


def test_prototypes_k_larger_than_pixels_and_empty_sides(caplog):
    feats, fg, bg = _constructed()
    with caplog.at_level(logging.WARNING):
        p = prototypes_from_features(feats, fg, torch.zeros_like(bg), class_name="t", extractor="x")
    assert "only 8 pixels for K=32" in caplog.text
    assert (p.fg_kind == KMEANS_CENTRE).sum() == 8 and p.bg.shape == (0, 2)
    with pytest.raises(ValueError, match="no support image has foreground"):
        prototypes_from_features(feats, torch.zeros_like(fg), bg, class_name="t", extractor="x")
    with pytest.raises(ValueError, match="2 support names for 3"):
        prototypes_from_features(feats, fg, bg, class_name="t", extractor="x", support=["a", "b"])


def test_prototypes_reject_inconsistent_fields():
    feats, fg, bg = _constructed()
    p = prototypes_from_features(feats, fg, bg, class_name="t", extractor="x", kmeans_k=2)
    fields = {k: getattr(p, k) for k in p.__dataclass_fields__}
    with pytest.raises(ValueError, match="inconsistent fg"):
        Prototypes(**{**fields, "fg_kind": p.fg_kind[:-1]})
    with pytest.raises(ValueError, match="support has 1"):
        Prototypes(**{**fields, "support": ["only one"]})


# --- building and caching ----------------------------------------------------------------------


class CountingSupport(FolderSupport):
    def __init__(self, folder):
        super().__init__(folder, size=64)
        self.calls = []

    def __call__(self, name):
        self.calls.append(name)
        return super().__call__(name)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_voc(root, num_images=1, classes=2, image_size=64, num_support=2)
    return root / "support"


def test_build_prototypes_known_colours(synthetic):
    colour = ColourExtractor()
    protos = build_prototypes(["ball", "box"], [colour], FolderSupport(synthetic, 64), "saliency")
    ball = torch.tensor(CATALOGUE[0].colour) / 255 * 2 - 1  # solid red
    red = protos["ball"]["colour"]
    assert red.support[0].endswith("000.png") and len(red.support) == 2
    # Some k-means centre is the pure object colour; the background mean is near the colour of
    # the image borders (cells touching the object count as background too: a little red).
    assert (red.fg[red.fg_kind == KMEANS_CENTRE, :3] - ball).norm(dim=1).min() < 0.05
    images = load_support_folder(synthetic, "ball", 64).images
    border = torch.cat([images[:, :, 0], images[:, :, -1]], dim=2).mean((0, 2)) * 2 - 1
    bg_mean = red.bg[red.bg_kind == CLASS_MEAN][0, :3]
    assert (bg_mean - border).norm() < 0.2 < 0.8 < (bg_mean - ball).norm()
    assert set(protos) == {"ball", "box"} and protos["box"]["colour"].class_name == "box"


def test_cache_builds_once_rebuilds_corrupt_and_keys_settings(synthetic, tmp_path, caplog):
    source = CountingSupport(synthetic)
    cache = PrototypeCache(tmp_path)
    colour = ColourExtractor()
    first = build_prototypes(["ball", "box"], [colour], source, "saliency", cache, kmeans_k=4)
    assert source.calls == ["ball", "box"] and len(list(tmp_path.glob("*.pt"))) == 2
    second = build_prototypes(["ball", "box"], [colour], source, "saliency", cache, kmeans_k=4)
    assert source.calls == ["ball", "box"]  # nothing built
    assert torch.equal(second["ball"]["colour"].fg, first["ball"]["colour"].fg)
    assert torch.equal(second["box"]["colour"].bg_region, first["box"]["colour"].bg_region)
    # A truncated file is detected and only that class is rebuilt, identically.
    path = next(tmp_path.glob("ball.colour.*.pt"))
    path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING):
        third = build_prototypes(["ball", "box"], [colour], source, "saliency", cache, kmeans_k=4)
    assert "unusable" in caplog.text and source.calls == ["ball", "box", "ball"]
    assert torch.equal(third["ball"]["colour"].fg, first["ball"]["colour"].fg)
    # Other settings, another key; the old files stay valid.
    build_prototypes(["ball"], [colour], source, "saliency", cache, kmeans_k=3)
    assert source.calls[-1] == "ball" and len(list(tmp_path.glob("ball.*.pt"))) == 2
    # A second extractor for a cached class: one support fetch, only the new extractor built.
    dino = build_extractor("dino:tiny_vit8", vit_weights="random")
    both = build_prototypes(["box"], [colour, dino], source, "saliency", cache, kmeans_k=4)
    assert source.calls[-1] == "box" and len(source.calls) == 5
    assert torch.equal(both["box"]["colour"].fg, first["box"]["colour"].fg)
    assert both["box"]["dino:tiny_vit8"].fg.shape[1] == dino.dim


def test_cache_detects_a_file_for_another_class(tmp_path, caplog):
    feats, fg, bg = _constructed()
    p = prototypes_from_features(feats, fg, bg, class_name="a", extractor="x", kmeans_k=2)
    cache = PrototypeCache(tmp_path)
    written = cache.save(p, {"k": 1})
    assert cache.load("a", "x", {"k": 1}).class_name == "a"
    assert cache.load("a", "x", {"k": 2}) is None
    written.rename(cache.path("b", "x", {"k": 1}))
    with caplog.at_level(logging.WARNING):
        assert cache.load("b", "x", {"k": 1}) is None
    assert "holds 'a'/x" in caplog.text


def test_build_prototypes_rejects_bad_input_before_work(synthetic):
    source = CountingSupport(synthetic)
    colour = [ColourExtractor()]
    with pytest.raises(ValueError, match="non-empty list"):
        build_prototypes([], colour, source)
    with pytest.raises(ValueError, match="duplicates"):
        build_prototypes(["ball", "ball"], colour, source)
    with pytest.raises(ValueError, match="unknown mask proposer"):
        build_prototypes(["ball"], colour, source, "sam")
    with pytest.raises(ValueError, match="distinct extractors"):
        build_prototypes(["ball"], colour * 2, source)
    assert source.calls == []
    with pytest.raises(ValueError, match="needs attribution maps"):
        build_prototypes(["ball"], colour, source, "attention")


def test_folder_without_images_names_the_folder(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "stray.png")
    with pytest.raises(FileNotFoundError, match="ball"):
        build_prototypes(["ball"], [ColourExtractor()], FolderSupport(tmp_path), "saliency")
