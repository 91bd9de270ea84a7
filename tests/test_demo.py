"""`sdzero demo`: its parts, what each says about its numbers, and the SD part's real pipeline."""

import io
import json

import pytest
import torch
from PIL import Image

import sdzero.runs
from sdzero.cli import DEMO_PARTS, main
from sdzero.config import compose
from sdzero.runs import run_eval
from sdzero.segmentation.prototypes import PrototypeCache


def test_demo_checks_every_part_first_then_runs_each_into_its_folder(tmp_path, monkeypatch, capsys):
    ran = []

    def fake_run(cfg):
        ran.append((cfg.experiment, cfg.output_dir))
        return {"task": cfg.experiment}

    monkeypatch.setattr(sdzero.runs, "run_eval", fake_run)
    assert main(["demo", "--out", str(tmp_path), "method.no_such_key=1"]) == 2
    assert ran == []  # a bad override stops the demo before any part runs
    assert main(["demo", "--out", str(tmp_path)]) == 0
    assert ran == [
        ("demo_correspondence", str(tmp_path / "correspondence")),
        ("demo_segmentation", str(tmp_path / "segmentation")),
        ("demo_segmentation_sd", str(tmp_path / "segmentation_sd")),
    ]
    out = capsys.readouterr().out
    texts = {name: text for name, _, text in DEMO_PARTS}
    assert all(text in out for text in texts.values())
    assert "no Stable Diffusion" in texts["demo_segmentation"]
    assert "RANDOM WEIGHTS" in texts["demo_segmentation_sd"]


def test_sd_demo_samples_support_with_sd_and_builds_sd_prototypes(tmp_path):
    run = tmp_path / "run"
    overrides = ["data.num_images=1", "method.num_support=2", "method.sampling_steps=2"]
    cfg = compose(
        "demo_segmentation_sd",
        [f"output_dir={run}", "logger=none", "trainer.enable_progress_bar=false", *overrides],
    )
    metrics = run_eval(cfg)
    assert "RANDOM WEIGHTS" in metrics["warning"]
    support = sorted((run / "prototypes" / "support").iterdir())
    assert [s.name.split("-")[0] for s in support] == ["ball", "box", "kite"]
    for folder in support:
        manifest = json.loads((folder / "support.json").read_text())
        assert manifest["source"] == "generated" and manifest["backbone"].startswith("random:tiny")
        assert (manifest["count"], manifest["size"], manifest["steps"]) == (2, 128, 2)
        for image in sorted(folder.glob("*.png")):
            assert Image.open(image).size == (128, 128)
        assert torch.load(folder / "attribution.pt").shape == (2, 128, 128)
    files = sorted(p.name for p in (run / "prototypes").glob("*.pt"))
    assert [f.split(".")[:2] for f in files] == [["ball", "sd"], ["box", "sd"], ["kite", "sd"]]
    data = (run / "prototypes" / files[0]).read_bytes()
    header = data.index(b"\n") + 1 + 64  # the format line, then the payload's SHA-256
    state = torch.load(io.BytesIO(data[header:]), weights_only=True)
    assert state["fg_region"].shape[-2:] == (16, 16)  # SD features of 128 px inputs: 1/8


@pytest.mark.parametrize("key", ["support_size", "sd_input_size"])
def test_sd_sizes_must_be_multiples_of_64(key):
    from sdzero.errors import ConfigError

    with pytest.raises(ConfigError, match=f"method.{key} must be a multiple of 64, got 100"):
        compose("demo_segmentation_sd", [f"method.{key}=100"])


def test_prototype_cache_keys_the_sd_input_size(tmp_path):
    from sdzero.backbones.sd import load_stable_diffusion
    from sdzero.segmentation.features import SDQueryExtractor

    sd = load_stable_diffusion(None, "tiny", text_encoder=True)
    small, large = (SDQueryExtractor(sd, input_size=s).settings for s in (64, 128))
    cache = PrototypeCache(tmp_path)
    assert cache.path("ball", "sd", small) != cache.path("ball", "sd", large)
