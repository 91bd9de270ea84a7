"""``benchmarks/bench_dift.py``'s side-by-side job without the old stack: the pair lists both codes
read, the arithmetic of its rows, the digest naming across stacks, the skip, one sdzero round on
the tiny model, and FLOPs counted on meta tensors against a real pass."""

import os

import pytest
import torch

from benchmarks import bench_dift
from benchmarks import dift_side as side
from benchmarks.common import count_flops
from datamodules.spair import SPairDataset
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.backbones.sd_features import up_block_features
from sdzero.correspondence.dift import DIFT


@pytest.mark.parametrize("images, pairs", [(2, 4), (1, 2)])
def test_pair_list_has_the_asked_pairs_images_and_keypoints(tmp_path, images, pairs):
    setting = side.Setting("x", 64, 2, images=images, pairs=pairs)
    data = side.write_pair_list(tmp_path / "data", setting, 64)
    items = [SPairDataset(data)[i] for i in range(pairs)]
    assert len(SPairDataset(data)) == pairs
    assert len(side.image_names(data)) == images
    for item in items:
        assert item["src_kps"].shape == item["trg_kps"].shape == (side.KEYPOINTS, 2)
        w, h = item["src_img"].shape[2], item["src_img"].shape[1]
        assert (item["src_kps"] >= 0).all() and (item["src_kps"][:, 0] < w).all()
        assert (item["src_kps"][:, 1] < h).all()
    first, second = items[0], items[1]
    if images == 2:  # the second pair is the first one reversed
        assert (first["src_name"], first["trg_name"]) == (second["trg_name"], second["src_name"])
        assert torch.equal(first["src_kps"], second["trg_kps"])
    else:  # one image matched with itself
        assert first["src_name"] == first["trg_name"] == second["src_name"]
        assert torch.equal(first["src_kps"], first["trg_kps"])
    # the official loop's listing: every pair file of the category, by name
    listed = [n for n in os.listdir(data / "PairAnnotation" / "test") if items[0]["category"] in n]
    assert len(listed) == pairs


def timing(per_image, rest, pairs=4, features=None):
    images = len(per_image)
    loop = sum(per_image) + rest * pairs
    return side.Timing(per_image, loop, rest, pairs, images, features=features or {})


def test_rows_compose_per_pair_from_per_image_and_matching():
    s = side.Setting("reduced", 256, 8, images=2, pairs=4)
    ref = {"JPEGImages/c/a.jpg": torch.ones(3, 2, 2)}
    mine_feats = {"JPEGImages/c/a.jpg": torch.ones(3, 2, 2) * 1.01}
    official = [
        {"timings": {"reduced": timing([10.0, 12.0], 2.0, features=ref)}},
        {"timings": {"reduced": timing([12.0, 10.0], 2.0, features=ref)}},
    ]
    mine = [{"timings": {"reduced": timing([4.0, 4.0], 0.5, features=mine_feats)}}]
    extra = {"official_note": "o", "weights_note": "w", "match_flops": {"reduced": 7.0}}
    rows = bench_dift.side_rows(s, official, mine, (100.0, 10.0), extra)
    assert len(rows) == 9

    def by(prefix, mode):
        (row,) = [r for r in rows if r.unit.startswith(prefix) and r.mode == mode]
        return row

    assert by("features per image", "official").seconds == pytest.approx(11.0)
    assert by("features per image", "official").flops == 8 * (100 + 10)
    assert by("features per image", "sdzero").seconds == pytest.approx(4.0)
    assert by("features per image", "sdzero").flops == 100 + 8 * 10
    note = by("features per image", "sdzero").note
    assert "official/sdzero 2.75x" in note and "1.0e-02 relative" in note
    per_pair = "per pair at SPair test's 6.8 pairs per image"
    ratio = 12_234 / 1_800
    assert by(per_pair, "official").seconds == pytest.approx(11.0 / ratio + 2.0)
    assert by(per_pair, "sdzero (feature cache)").seconds == pytest.approx(4.0 / ratio + 0.5)
    assert by(per_pair, "sdzero (no cache)").seconds == pytest.approx(2 * 4.0 + 0.5)
    listed = by("per pair, list", "official")  # the list's loop: (22 + 8) s over 4 pairs
    assert listed.seconds == pytest.approx(30.0 / 4)
    assert by("per pair, list", "sdzero (feature cache)").seconds == pytest.approx(10.0 / 4)
    assert by("per pair, matching", "official").seconds == 2.0
    assert by("per pair, matching", "sdzero").flops == 7.0


def test_digests_compare_under_one_naming_across_stacks():
    old = {
        "vae.encoder": {"mid_block.attentions.0.query.weight": "a", "conv_in.weight": "b"},
        "text_encoder": {
            "text_model.embeddings.position_ids": "p",
            "text_model.final_layer_norm.weight": "c",
        },
    }
    new = {
        "vae.encoder": {"mid_block.attentions.0.to_q.weight": "a", "conv_in.weight": "b"},
        "text_encoder": {"final_layer_norm.weight": "c"},
    }
    assert side.comparable_digests(old) == side.comparable_digests(new)
    new["vae.encoder"]["conv_in.weight"] = "changed"
    assert side.comparable_digests(old) != side.comparable_digests(new)


def test_side_by_side_skips_with_a_reason_without_the_old_stack(monkeypatch, tmp_path):
    monkeypatch.delenv("SDZERO_DIFT_PYTHON", raising=False)
    (row,) = bench_dift.side_by_side("cpu", quick=True)
    assert row.mode == "skipped" and "SDZERO_DIFT_PYTHON" in row.note
    monkeypatch.setenv("SDZERO_DIFT_PYTHON", str(tmp_path / "absent" / "python"))
    (row,) = bench_dift.side_by_side("cpu", quick=True)
    assert row.mode == "skipped" and "SDZERO_DIFT_PYTHON" in row.note
    (row,) = bench_dift.side_by_side("cuda", quick=True)
    assert row.mode == "skipped" and "CPU" in row.note


def test_method_round_extracts_each_image_once_and_times_every_pair(tmp_path):
    setting = side.Setting("x", 64, 2, images=2, pairs=4)
    data = side.write_pair_list(tmp_path / "data", setting, 64)
    method = DIFT(
        {"weights": None, "arch": "tiny"},
        image_size=64,
        ensemble_size=2,
        feature_cache=str(tmp_path / "cache"),
    )
    method.sd = load_stable_diffusion(None, "tiny", text_encoder=True)
    method.eval()
    got = side.method_round(method, data, keep_features=True)
    assert (got.images, got.pairs, len(got.per_image)) == (2, 4, 2)
    assert sorted(got.features) == side.image_names(data)
    assert got.loop >= sum(got.per_image) + 3 * got.rest
    name = side.image_names(data)[0]
    item = next(i for i in SPairDataset(data) if i["src_name"] == name)
    frame = method.frame(item["src_img"]).image(item["src_img"])
    again = method.features(frame, [name], item["category"])
    assert side.relative_difference({name: again[0]}, got.features) == 0.0
    assert "features" not in vars(method)  # the timing wrapper is gone


def test_flops_counted_on_meta_tensors_equal_a_real_pass():
    vae, unet = side.dift_component_flops("tiny", 64)
    sd = load_stable_diffusion(None, "tiny")
    x, latents = torch.rand(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    context = torch.randn(1, 77, sd.unet.config.cross_attention_dim)
    with torch.no_grad():
        assert vae == count_flops(lambda: sd.vae.encode(x).latent_dist.mean) > 0
        assert unet == count_flops(lambda: up_block_features(sd, latents, 261, context, [1])) > 0
