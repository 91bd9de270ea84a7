"""End-to-end correspondence on synthetic pairs with known answers (tiny random-weight backbone).

Random networks carry no semantics, so only what must hold with random weights is asserted, with
the measured numbers stated (1 embedding, 15 steps at lr 0.2, 4 inference crops, 128 px):
identical target PCK@0.1 = 76% (median error 11 px), whole-latent-cell shift PCK@0.1 = 29%, chance
(a uniform guess within 0.1 * 128 px) = 3.1%.
"""

import json
import math

import pytest
import torch

from datamodules.synthetic_correspondence import SyntheticCorrespondenceDataModule
from sdzero.config import compose
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence
from sdzero.metrics.pck import PCK
from sdzero.records import read_records
from sdzero.runs import run_eval
from sdzero.tasks.frames import ModelFrame

S = 128
CHANCE = math.pi * (0.1 * S) ** 2 / S**2  # 3.1%


def _errors(sd, kind):
    dm = SyntheticCorrespondenceDataModule(kind=kind, num_pairs=3, image_size=S)
    dm.setup()
    cfg = FitConfig(
        image_size=S, steps=15, num_embeddings=1, inference_crops=4, lr=0.2, infer_timestep=140
    )
    pc = PromptCorrespondence(sd, cfg)
    errors = []
    for i in range(len(dm.dataset)):
        b = dm.dataset[i]
        f, g = ModelFrame(*b["src_size"], S), ModelFrame(*b["trg_size"], S)
        pred = pc.match(
            f.image(b["src_img"]), g.image(b["trg_img"]), f.to_model(b["src_kps"]), 0, i
        )
        errors.append((g.to_original(pred) - b["trg_kps"]).norm(dim=1))
    return torch.cat(errors)


def test_identical_target_gives_back_the_query_points(sd):
    err = _errors(sd, "identical")
    assert err.median() <= S / 8  # one cell of the coarsest read layer is S/32... 4 cells: S/8
    assert (err <= 0.1 * S).float().mean() >= 0.5 > 10 * CHANCE / 2


def test_whole_cell_shift_moves_the_predictions_far_above_chance(sd):
    err = _errors(sd, "shift")
    assert (err <= 0.1 * S).float().mean() >= 4 * CHANCE


def test_demo_run_folder_is_complete_and_recomputable(tmp_path):
    out = tmp_path / "run"
    cfg = compose(
        "demo_correspondence",
        [
            f"output_dir={out}",
            "data.num_pairs=2",
            "method.steps=2",
            "method.num_embeddings=1",
            "logger=none",
        ],
    )
    metrics = run_eval(cfg)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["task"] == "correspondence" and on_disk["split_size"] == 2
    assert on_disk["num_pairs"] == 2 and set(on_disk["pck"]) == {"0.05", "0.1", "0.15"}
    assert "RANDOM WEIGHTS" in on_disk["warning"]
    assert (out / "config.yaml").is_file() and list((out / "visuals").glob("*.png"))
    records = list(read_records(out / "predictions" / "rank0.jsonl"))
    assert [r["index"] for r in records] == [0, 1]
    # recompute metrics.json from the records alone
    pck = PCK(sorted({r["category"] for r in records}), threshold=on_disk["threshold"])
    for r in records:
        assert len(r["pred_kps"]) == len(r["src_kps"]) == len(r["trg_kps"])
        pck.update(
            r["pred_kps"],
            r["trg_kps"],
            category=r["category"],
            threshold_size=r["threshold_size"],
        )
    again = pck.compute()
    assert again["pck"] == pytest.approx(on_disk["pck"])
    assert again["pck_point"] == pytest.approx(on_disk["pck_point"])


def test_query_point_outside_the_image_is_a_clear_error(sd):
    from sdzero.correspondence.module import PromptCorrespondenceModule

    module = PromptCorrespondenceModule({"arch": "tiny", "weights": None}, image_size=S, steps=1)
    module.sd, module.method = sd, PromptCorrespondence(sd, module.settings)
    img = torch.zeros(3, 50, 80, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"query point \[90.0, 10.0\] lies outside the 80x50"):
        module.predict_pair(img, img, torch.tensor([[10.0, 10.0], [90.0, 10.0]]))
