"""The `sdzero` command: info, match, eval errors, demo."""

import json

import numpy as np
import pytest
from PIL import Image

from sdzero.cli import main


def test_info_lists_versions_backbones_and_experiments(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "diffusers" in out
    assert "tiny" in out and "random" in out.lower()
    assert "CompVis/stable-diffusion-v1-4" in out
    for name in ("spair_ldm", "pfwillow_ldm", "cub_ldm", "voc_ovdiff", "demo_correspondence"):
        assert name in out


def test_match_prints_points_and_draws_lines(tmp_path, capsys):
    rng = np.random.default_rng(0)
    src = tmp_path / "src.png"
    trg = tmp_path / "trg.jpg"
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(src)
    Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(trg)
    viz = tmp_path / "lines.png"
    code = main(
        [
            "match",
            str(src),
            str(trg),
            "--points",
            "10,20",
            "100.5,50",
            "--viz",
            str(viz),
            "backbone=tiny",
            "method.image_size=64",
            "method.steps=1",
            "method.num_embeddings=1",
            "method.inference_crops=4",
        ]
    )
    assert code == 0
    points = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(points) == 2
    assert all(0 <= x <= 80 and 0 <= y <= 64 for x, y in points)  # target pixels
    with Image.open(viz) as img:
        assert img.size == (128 + 80, 96)


def test_match_rejects_a_point_outside_the_source(tmp_path):
    src = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(src)
    with pytest.raises(ValueError, match="outside the 32x32 source image"):
        main(
            [
                "match",
                str(src),
                str(src),
                "--points",
                "40,5",
                "backbone=tiny",
                "method.image_size=64",
                "method.steps=1",
            ]
        )


def test_eval_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["eval", "spair_ldm", f"data.root={tmp_path}", "method.lrr=1"]) == 2
    assert "method.lr" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "spair_ldm",
                f"data.root={tmp_path / 'nope'}",
                "backbone=tiny",
                f"output_dir={tmp_path / 'r'}",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is not a folder" in err and "PairAnnotation" in err
    # real weights that are not in the (offline) cache: our message, not a library traceback
    code = main(
        [
            "eval",
            "demo_correspondence",
            "backbone=sd14",
            f"output_dir={tmp_path / 'w'}",
            "data.num_pairs=1",
            "logger=none",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "CompVis/stable-diffusion-v1-4" in err and "download" in err
