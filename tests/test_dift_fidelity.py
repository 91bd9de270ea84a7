"""sdzero's ``dift`` against DIFT's official outputs (``fixtures/dift_tiny/``, README there).

The official ``eval_spair.py`` (diffusers 0.15) ran on a tiny random SD-2.1-topology model and 4
synthetic SPair-layout pairs, with sdzero's per-image draws injected; here sdzero loads the same
folder and data with its own loaders and must give the official prompt embeddings and features to
1e-5 relative (``max|sdzero - official| / max|official|``), every argmax pixel exactly, and the
printed PCK.
"""

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from datamodules.spair import SPairDataset
from sdzero.backbones.sd import load_stable_diffusion
from sdzero.config import compose
from sdzero.correspondence.base import PairInfo
from sdzero.correspondence.dift import DIFT, copy_generator
from sdzero.correspondence.matching import nearest_pixels
from sdzero.runs import run_eval

ROOT = Path(__file__).parent / "fixtures" / "dift_tiny"
MODEL, DATA = ROOT / "tiny_sd21", ROOT / "SPair-71k"
TOL = 1e-5
# diffusers 0.15 names of the VAE mid-block attention (modern -> 0.15)
VAE_RENAMES = [
    ("to_q.", "query."),
    ("to_k.", "key."),
    ("to_v.", "value."),
    ("to_out.0.", "proj_attn."),
]


def rel(mine: torch.Tensor, ref: torch.Tensor) -> float:
    a, b = mine.double(), ref.double()
    assert a.shape == b.shape
    return ((a - b).abs().max() / b.abs().max()).item()


def hashes(module: torch.nn.Module, prefix: str = "", renames=()) -> dict[str, str]:
    out = {}
    for name, tensor in module.state_dict().items():
        if name.endswith("position_ids"):  # a buffer older transformers saved, newer recompute
            continue
        name = name.removeprefix(prefix)
        for a, b in renames:
            name = name.replace(f"mid_block.attentions.0.{a}", f"mid_block.attentions.0.{b}")
        out[name] = hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def fx():
    with safe_open(str(ROOT / "official.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = json.loads(f.metadata()["meta"])
    official = meta["settings"]
    method = DIFT(
        {"weights": str(MODEL), "arch": None},
        seed=meta["seed"],
        image_size=official["img_size"],
        timestep=official["t"],
        up_ft_index=official["up_ft_index"],
        ensemble_size=official["ensemble_size"],
    )
    method.sd = load_stable_diffusion(str(MODEL), text_encoder=True)
    return tensors, meta, method


def test_weights_are_the_official_ones(fx):
    _, meta, method = fx
    sha, sd = meta["sha256"], method.sd
    assert hashes(sd.unet) == sha["unet"]
    assert hashes(sd.vae.encoder, renames=VAE_RENAMES) == sha["vae.encoder"]
    # transformers 5 names the text model's tensors without the "text_model." prefix
    official_text = {k.removeprefix("text_model."): v for k, v in sha["text_encoder"].items()}
    assert hashes(sd.text_encoder, "text_model.") == {
        k: v for k, v in official_text.items() if not k.endswith("position_ids")
    }


def test_injected_draws_are_sdzeros_streams(fx):
    _, meta, _ = fx
    for name in meta["images"]:
        latent = meta["settings"]["img_size"] // 8
        posterior, noise = [], []
        for k in range(meta["settings"]["ensemble_size"]):
            g = copy_generator(meta["seed"], name, k)
            posterior.append(torch.randn((1, 4, latent, latent), generator=g))
            noise.append(torch.randn((1, 4, latent, latent), generator=g))
        for kind, draws in (("posterior", posterior), ("noise", noise)):
            digest = hashlib.sha256(torch.cat(draws).numpy().tobytes()).hexdigest()
            assert digest == meta["draws_sha256"][f"{name}.{kind}"], (name, kind)


def test_prompt_embeddings_equal_the_official(fx):
    tensors, _, method = fx
    for category in ("discs", "squares"):
        got = method.prompt_embedding(category)[0]
        assert rel(got, tensors[f"prompt.{category}"]) <= TOL, category


def test_features_equal_the_official(fx):
    tensors, meta, method = fx
    dataset = SPairDataset(DATA)
    seen = 0
    for i in range(len(dataset)):
        item = dataset[i]
        for side in ("src", "trg"):
            name, image = item[f"{side}_name"], item[f"{side}_img"]
            x = method.frame(image).image(image)
            got = method.features(x, [name], item["category"])[0]
            assert rel(got, tensors[f"features.{name}"]) <= TOL, name
            seen += 1
    assert seen == len(meta["images"]) == 8


def test_matching_rule_gives_the_official_pixels(fx):
    tensors, _, method = fx
    dataset = SPairDataset(DATA)
    for i in range(len(dataset)):
        item = dataset[i]
        want = tensors[f"pred.{item['id']}"].float()
        src_feats = tensors[f"features.{item['src_name']}"]
        trg_feats = tensors[f"features.{item['trg_name']}"]
        hw = [(int(item[f"{s}_size"][1]), int(item[f"{s}_size"][0])) for s in ("src", "trg")]
        got = nearest_pixels(src_feats, trg_feats, item["src_kps"], *hw)
        assert torch.equal(got, want), item["id"]
        pair = PairInfo(i, item["category"], item["src_name"], item["trg_name"])
        end_to_end = method.predict_pair(item["src_img"], item["trg_img"], item["src_kps"], pair)
        assert torch.equal(end_to_end, want), item["id"]


def test_spair_run_prints_the_official_pck(fx, tmp_path):
    _, meta, _ = fx
    official = meta["settings"]
    printed = "\n".join(meta["printed"])
    per_image = float(re.search(r"All per image PCK@0.1: ([\d.]+)", printed).group(1))
    per_point = float(re.search(r"All per point PCK@0.1: ([\d.]+)", printed).group(1))
    cfg = compose(
        "spair_dift",
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.root={DATA}",
            f"backbone.weights={MODEL}",
            "backbone.arch=null",
            "trainer=cpu",
            "logger=none",
            "visuals=0",
            "trainer.enable_progress_bar=false",
            f"seed={meta['seed']}",
            f"method.image_size={official['img_size']}",
            f"method.ensemble_size={official['ensemble_size']}",
        ],
    )
    got = run_eval(cfg)
    assert round(got["pck"]["0.1"], 2) == per_image
    assert round(got["pck_point"]["0.1"], 2) == per_point
