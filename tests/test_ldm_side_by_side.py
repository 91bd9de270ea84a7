"""The per-pair accounting and the side-by-side job's arithmetic (``benchmarks/corr_pairs.py``,
``benchmarks/reference/ldm/side_by_side.py``), on hand-made inputs: no official stack needed."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from benchmarks import corr_pairs
from benchmarks.bench_correspondence import vs_official
from benchmarks.reference.ldm import side_by_side as side
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence


def test_points_are_placed_by_the_pascal_image_size_rule(tmp_path):
    dhf = [
        {  # landscape: nothing below y = 375
            "category": "cat",
            "source_points": [[100, 50], [499, 300]],
            "target_points": [[10, 10]],
            "source_bounding_box": [0, 0, 450, 320],
            "target_bounding_box": [0, 0, 20, 20],
        },
        {  # portrait: below y = 375 and narrow; square: wide and tall
            "category": "dog",
            "source_points": [[100, 480]],
            "target_points": [[400, 400]],
            "source_bounding_box": [0, 0, 300, 490],
            "target_bounding_box": [0, 0, 420, 410],
        },
    ]
    path = tmp_path / "list.json"
    path.write_text(json.dumps(dhf))
    a, b = corr_pairs.derive(path)
    assert a["source"] == [[0.2, round(50 / 375, 5)], [0.998, 0.8]]
    assert b["source"] == [[round(100 / 375, 5), 0.96]] and b["target"] == [[0.8, 0.8]]


def test_pair_seconds_add_each_points_unet_work_and_the_pairs_encodes():
    work = corr_pairs.PairWork(points=[1, 3], encodes=[100, 250])
    assert work.seconds(per_point=10.0, per_encode=2.0) == [210.0, 530.0]


def _pc(**kw):
    unet = SimpleNamespace(config=SimpleNamespace(cross_attention_dim=768))
    return PromptCorrespondence(SimpleNamespace(unet=unet), FitConfig(**kw))


def test_distinct_source_crops_are_the_ones_a_match_encodes(sd, monkeypatch):
    cfg = FitConfig(image_size=128, steps=4, num_embeddings=2, inference_crops=4)
    pc = PromptCorrespondence(sd, cfg)
    pair = corr_pairs.Pair("cat", torch.tensor([[30.0, 40.0], [64.0, 64.0]]), torch.zeros(2, 2))
    caches = []
    real = pc.latent_cache
    monkeypatch.setattr(pc, "latent_cache", lambda image: caches.append(real(image)) or caches[-1])
    image = torch.rand(1, 3, 128, 128)
    pc.match(image, image.flip(-1), pair.source, seed=0, index=5)
    n_src, n_trg = corr_pairs.distinct_crops(pc, pair, index=5)
    assert caches[0].misses == n_src and n_src <= 2 * 2 * 4
    assert n_trg == 4  # 4 inference crops: the corners, shared by every item


def test_recorded_encodes_are_the_replayed_ones():
    work = corr_pairs.recorded_work()
    pairs = corr_pairs.load_pairs()
    assert len(work.encodes) == len(pairs) == 360 and sum(work.points) == 2529
    assert corr_pairs.points_per_pair()[1] == 9
    i = work.points.index(1)  # the cheapest pair to replay
    assert sum(corr_pairs.distinct_crops(_pc(), pairs[i], i)) == work.encodes[i]


def _result(step, pass_, vae, unet, peak, **extra):
    def calls(seconds):
        parts = {"vae_encode": vae, "unet_forward": unet}
        return {"seconds": [seconds, seconds], "parts": [parts, parts], "peak_rss_gb": peak}

    out = {"step": calls(step), "pass": calls(pass_), **extra}
    out["machine"] = {"cpu": "Test CPU", "cores": 2, "threads": 2}
    out["versions"] = {"torch": "2.x", "diffusers": "0.8.0", "transformers": "4.26.1"}
    out["commit"] = "97e3246f0fcfd92eee6cf03e6cb085c24a7fc768"
    return out


def test_rows_are_ratios_of_this_runs_rounds():
    off = [_result(30.0, 20.0, 7.0, 14.0, 13.1), _result(28.0, 18.0, 7.0, 13.0, 13.1)]
    own = _result(14.5, 9.0, 7.5, 3.0, 9.0)
    own.update(step5=_result(60.0, 0, 37.5, 10.0, 11.0)["step"])
    own.update(pass5=_result(20.0, 0, 7.5, 9.0, 11.0)["step"])
    results = {"official": off, "sdzero": [own], "order": ["official", "sdzero", "official"]}
    results["tensors"] = 870
    work = corr_pairs.PairWork(points=[2, 4], encodes=[1000, 1500])
    rows = {(r.unit, r.mode): r for r in side.rows(results, work, {"step": 2.0e12})}
    step = rows[("optimisation step, 1 embedding, 512 px", "sdzero exact")]
    assert step.seconds == 14.5 and step.flops == 2.0e12
    assert "official/sdzero 2.00x (A/B/A)" in step.note  # (30 + 28) / 2 / 14.5
    assert rows[("inference pass, 512 px", "official")].seconds == 19.0
    o_point = 5 * (129 * 29.0 + 20 * 19.0)
    assert rows[("per query point, 512 px", "official")].seconds == pytest.approx(o_point)
    unet_point = 129 * (60.0 - 37.5) + 20 * (20.0 - 7.5)
    mine = [2 * unet_point + 1000 * 7.5, 4 * unet_point + 1500 * 7.5]
    pair = rows[("per pair, SPair test-360 points, 512 px", "sdzero exact")]
    assert pair.seconds == pytest.approx(sum(mine) / 2)
    assert f"official/sdzero {3 * o_point / (sum(mine) / 2):.2f}x" in pair.note
    machine = rows[("machine", "both")]
    assert math.isnan(machine.seconds) and "Test CPU, 2 cores" in machine.note
    assert "official 97e3246: torch 2.x, diffusers 0.8.0" in machine.note and "870" in machine.note


def test_digests_compare_under_the_old_names_and_the_job_is_opt_in(monkeypatch):
    modern = {"vae": {"encoder.mid_block.attentions.0.to_q.weight": "a", "x": "b"}}
    assert side.comparable(modern) == {
        "vae": {"encoder.mid_block.attentions.0.query.weight": "a", "x": "b"}
    }
    monkeypatch.delenv("SDZERO_LDM_PYTHON", raising=False)
    (row,) = vs_official("cpu", quick=True)
    assert row.mode == "skipped" and "SDZERO_LDM_PYTHON" in row.note
    monkeypatch.setenv("SDZERO_LDM_ROUNDS", "sdzero")
    with pytest.raises(ValueError, match="SDZERO_LDM_ROUNDS"):
        side.settings()
