"""GeoAware-SC's zero-shot setting on ``method=sd_dino``: the raw-layer descriptor against the
official computation written out here, and pose alignment (flip) with the window soft-argmax on
the synthetic ``mirror`` pairs, with known answers: plain matching sends every twin part to its
twin, the mirrored source recovers all; SPair's left/right ids follow the parts' semantics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datamodules.spair import SPairDataset
from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.fusion import pack
from sdzero.correspondence.mirror_keypoints import SPAIR_MIRROR_PARTNERS
from sdzero.correspondence.sd_dino import SDDINO
from sdzero.errors import ConfigError, InputError

BACKBONE = {"arch": "tiny", "weights": None}
TINY = {
    "image_size": 128,
    "sd_window": 64,
    "pca_dims": (3, 4, 5),
    "pca_solver": "svd",
    "dino_model": "tiny_dinov2",
    "dino_weights": "random",
    "dino_size": 112,
}
# GeoAware-SC's zero-shot keys (experiment=geoaware_zs) at the tiny sizes: grid 16 for its 64
GEOAWARE = {
    "fusion": "concat",
    "patch_offset": 0.0,
    "flip_align": True,
    "flip_mask": "box",
    "flip_grid": 16,
    "flip_keypoints": "none",
}
SIZE = 64  # synthetic image side; the 128 px frame's 8 x 8 patches are 8 image pixels wide
CELL = SIZE / 8


def test_concat_fusion_is_geoaware_zero_shot_descriptor():
    """DUMMY_NET: s3, then s4 and s5 each resized bilinearly to s3's grid, then DINO; the SD and
    DINO parts each L2-normalised (eps 1e-10) and the whole normalised again. sdzero's descriptor
    is the same up to one factor per cell (cosine nearest neighbours and unit distances agree)."""
    method = SDDINO(BACKBONE, **{**TINY, "fusion": "concat"})
    gen = torch.Generator().manual_seed(0)
    sides = (2, 4, 8)
    parts = [
        [torch.randn(c, g, g, generator=gen) for c, g in zip((6, 5, 4), sides, strict=True)]
        + [torch.randn(7, 8, 8, generator=gen)]
        for _ in range(2)
    ]
    got = method.pair_descriptors(pack(parts[0]), pack(parts[1]), "a", "b")
    for mine, (s5, s4, s3, dino) in zip(got, parts, strict=True):
        grown = [
            F.interpolate(m[None], size=(8, 8), mode="bilinear", align_corners=False)[0]
            for m in (s4, s5)
        ]
        sd = torch.cat([s3, *grown])
        sd = sd / (sd.norm(dim=0, keepdim=True) + 1e-10)
        dn = dino / (dino.norm(dim=0, keepdim=True) + 1e-10)
        official = torch.cat([sd, dn])
        official = official / (official.norm(dim=0, keepdim=True) + 1e-10)
        assert mine.shape == (4 + 5 + 6 + 7, 8, 8)
        assert torch.allclose(F.normalize(mine, dim=0), official, atol=1e-6)


@pytest.fixture(scope="module")
def mirror_pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mirror")
    write_synthetic_spair(root, num_pairs=6, image_size=SIZE, seed=0, kind="mirror")
    return SPairDataset(root)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for every configuration here: the per-image parts do not depend on the
    fusion, matching or flip keys, so each image (and its mirror) is extracted once."""
    return str(tmp_path_factory.mktemp("parts"))


def make(cache, **settings):
    method = SDDINO(BACKBONE, seed=3, **{**TINY, "feature_cache": cache, **settings})
    torch.manual_seed(0)  # the random DINOv2's weights
    method.setup("test")
    return method.eval()


def errors(method, pairs, relabel=lambda b: b["trg_kps"], drop=()):
    """Per pair: ``{keypoint id: error (px)}`` of the method's predictions against
    ``relabel(sample)``, the keypoints with ids in ``drop`` left out of the pair."""
    out = []
    for index in range(len(pairs)):
        b = dict(pairs[index])
        target = relabel(b)
        ids = b["extra"]["kps_ids"]
        keep = [n for n, k in enumerate(ids) if k not in drop]
        b["src_kps"], target = b["src_kps"][keep], target[keep]
        b["extra"] = {**b["extra"], "kps_ids": [ids[n] for n in keep]}
        pred = method.predict_pair(b["src_img"], b["trg_img"], b["src_kps"], PairInfo.of(b))
        err = (pred - target).norm(dim=1).tolist()
        out.append(dict(zip(b["extra"]["kps_ids"], err, strict=True)))
    return out


def hits(errs) -> tuple[int, int]:
    """Points within one patch (CELL px) of their target, and points in all."""
    flat = [e for pair in errs for e in pair.values()]
    return sum(e < CELL for e in flat), len(flat)


@pytest.mark.parametrize("settings", [{"flip_align": True}, GEOAWARE], ids=["co_pca", "geoaware"])
def test_flip_alignment_recovers_the_mirrored_pairs(mirror_pairs, cache, settings):
    plain = errors(
        make(cache, **{k: v for k, v in settings.items() if "flip" not in k}), mirror_pairs
    )
    method = make(cache, **settings)
    names = []
    fuse = method.pair_descriptors

    def recorded(src, trg, src_name, trg_name):
        names.append((src_name, trg_name))
        return fuse(src, trg, src_name, trg_name)

    method.pair_descriptors = recorded
    aligned = errors(method, mirror_pairs)
    twins = [e for pair in plain for k, e in pair.items() if k < 6]
    heads = sum(len(pair) for pair in plain) - len(twins)
    # plain matching sends each twin to its twin (>= S/5 px away), the mirrored source hits all
    assert min(twins) > 1.3 * CELL
    assert hits(plain)[0] <= heads < hits(plain)[1]
    assert hits(aligned) == (hits(plain)[1],) * 2
    assert method.flips == (6, 6)
    # the mirrored source is fused with the target as a pair of its own
    src, trg = mirror_pairs[0]["src_name"], mirror_pairs[0]["trg_name"]
    assert names[:2] == [(src, trg), (src + "#flip", trg)]


def test_window_soft_argmax_keeps_the_recovered_matches(mirror_pairs, cache):
    found, total = hits(errors(make(cache, **GEOAWARE, soft_argmax_window=2), mirror_pairs))
    assert found == total


def semantic(b):
    """The mirrored target labelled as SPair labels parts: the twins of a mirrored object trade
    names (what stands where the left part stood is the right part), the head keeps its own."""
    ids = b["extra"]["kps_ids"]
    row = {k: n for n, k in enumerate(ids)}
    partner = [row[k ^ 1] if k < 6 else n for n, k in enumerate(ids)]
    return b["trg_kps"][partner]


@pytest.fixture
def twin_table(monkeypatch):
    for category in ("discs", "squares"):
        monkeypatch.setitem(SPAIR_MIRROR_PARTNERS, category, ((0, 1), (2, 3), (4, 5)))


def test_spair_ids_swap_left_and_right_for_the_mirrored_source(mirror_pairs, cache, twin_table):
    spair = make(cache, **{**GEOAWARE, "flip_keypoints": "spair"})
    own = make(cache, **GEOAWARE)
    by_own_ids = errors(own, mirror_pairs, semantic)
    total = hits(by_own_ids)[1]
    assert hits(errors(spair, mirror_pairs, semantic)) == (total, total)
    heads = sum(1 for pair in by_own_ids for k in pair if k >= 6)
    assert hits(by_own_ids)[0] == heads  # each twin sent to its partner
    # a twin whose partner is not in the pair keeps its unmirrored match (right under semantic
    # labels: plain matching finds the look-alike standing where it stood)
    alone = errors(spair, mirror_pairs, semantic, drop=(1,))
    assert all(0 in pair and 1 not in pair for pair in alone)
    assert hits(alone)[0] == hits(alone)[1]


def test_spair_ids_need_their_table_and_the_pairs_ids(mirror_pairs, cache):
    method = make(cache, **{**GEOAWARE, "flip_keypoints": "spair"})

    class Synthetic:
        category_names = ["discs", "squares"]

    with pytest.raises(ConfigError, match=r"method\.flip_keypoints=spair.*'discs'"):
        method.make_task(Synthetic())
    b = mirror_pairs[0]
    with pytest.raises(InputError, match=r"method\.flip_keypoints=spair needs"):
        method.predict_pair(b["src_img"], b["trg_img"], b["src_kps"], PairInfo(category="cat"))
