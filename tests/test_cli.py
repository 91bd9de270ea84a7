"""The `sdzero` command: info, match, and its one error path (user errors: one line, exit 2)."""

import json

import numpy as np
import pytest
from PIL import Image

from sdzero.cli import main
from sdzero.tasks.viz import MIN_SIDE, PAD, STAMP_RED, stamp_height


def test_info_lists_versions_backbones_and_experiments(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "diffusers" in out
    assert "tiny" in out and "random" in out.lower()
    assert "CompVis/stable-diffusion-v1-4" in out
    for name in ("spair_ldm", "pfwillow_ldm", "cub_ldm", "voc_ovdiff", "demo_correspondence"):
        assert name in out


def test_config_prints_every_method_key_with_its_value(tmp_path, capsys):
    from omegaconf import OmegaConf

    from sdzero.correspondence.module import CorrespondenceSettings
    from sdzero.settings import settings_defaults

    args = ["config", "spair_ldm", f"data.root={tmp_path}", "method.steps=7"]
    assert main(args) == 0
    cfg = OmegaConf.create(capsys.readouterr().out)
    expected = {**settings_defaults(CorrespondenceSettings), "steps": 7}
    expected |= {"pck_threshold": "bbox-source", "pck_frame": "resized"}  # the experiment's
    assert {k: v for k, v in OmegaConf.to_container(cfg.method).items() if k != "_target_"} == (
        expected
    )
    assert main(["config", "spair_ldm", f"data.root={tmp_path}", "method.steps=abc"]) == 2
    assert "method.steps must be an integer" in capsys.readouterr().err


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
    with Image.open(viz) as img:  # both images enlarged to MIN_SIDE, side by side
        rgb = img.convert("RGB")
    assert rgb.width == 2 * MIN_SIDE + PAD
    # tiny random weights: the red banner on top, then the white title strip
    assert rgb.getpixel((8, 8)) == STAMP_RED
    assert rgb.getpixel((8, stamp_height(rgb.width) + 4)) == (255, 255, 255)


def user_error(capsys, argv: list[str]) -> str:
    """Run ``sdzero ARGV``, assert it fails as a user error (exit 2, nothing on stdout, one
    ``sdzero: error:`` line on stderr, no traceback) and return that line."""
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sdzero: error: "), err
    return lines[0]


@pytest.fixture
def image(tmp_path):
    """A 32x32 (w x h) RGB PNG."""
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails loudly: a user error must be reported before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    from sdzero.correspondence.module import PromptCorrespondenceModule
    from sdzero.segmentation import api

    monkeypatch.setattr(PromptCorrespondenceModule, "setup", refuse)
    monkeypatch.setattr(api, "load_method", refuse)


MATCH = ["backbone=tiny", "method.image_size=64", "method.steps=1"]


def test_match_rejects_a_point_outside_the_source(image, capsys, no_model):
    line = user_error(capsys, ["match", str(image), str(image), "--points", "40,5", *MATCH])
    assert "query point [40.0, 5.0] lies outside the 32x32 (w x h) source image" in line
    assert str(image) in line


@pytest.mark.parametrize(
    ("points", "expected"),
    [(["4,5", "x,y"], "--points 'x,y': expected X,Y"), (["method.steps=1"], "at least one")],
)
def test_match_rejects_malformed_points(image, capsys, no_model, points, expected):
    line = user_error(capsys, ["match", str(image), str(image), "--points", *points, *MATCH])
    assert expected in line


def test_match_rejects_a_file_that_is_not_an_image(tmp_path, image, capsys, no_model):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    line = user_error(capsys, ["match", str(image), str(text), "--points", "4,5", *MATCH])
    assert f"image file {str(text)!r} cannot be read as an image" in line
    missing = tmp_path / "missing.jpg"
    line = user_error(capsys, ["match", str(missing), str(image), "--points", "4,5", *MATCH])
    assert f"image file {str(missing)!r} does not exist" in line


def test_segment_user_errors_name_the_argument(tmp_path, image, capsys, no_model):
    explain = ["--explain", str(tmp_path / "why.png")]
    line = user_error(
        capsys, ["segment", str(image), "--classes", "cat", "--pixel", "40,3", *explain]
    )
    assert "--pixel (40, 3) lies outside the 32x32 (w x h) image" in line and str(image) in line
    line = user_error(capsys, ["segment", str(image), "--classes", "cat", "--explain", "w.png"])
    assert "--explain needs --pixel X,Y" in line
    missing = tmp_path / "nope.png"
    line = user_error(capsys, ["segment", str(missing), "--classes", "cat"])
    assert f"image file {str(missing)!r} does not exist" in line


def test_an_empty_support_folder_is_one_error_line(tmp_path, image, capsys):
    (tmp_path / "support").mkdir()
    line = user_error(
        capsys,
        [
            "segment",
            str(image),
            "--classes",
            "cat",
            f"method.support_folder={tmp_path / 'support'}",
            "method.extractors=[colour]",
            "method.mask_proposer=saliency",
            "method.clip_filter=false",
            f"method.prototype_cache={tmp_path / 'cache'}",
        ],
    )
    assert "method.support_folder: no support images for class 'cat'" in line
    assert str(tmp_path / "support" / "cat") in line


def test_prototypes_build_user_errors_name_the_argument_or_key(tmp_path, capsys, no_model):
    build = ["prototypes", "build", "--out", str(tmp_path / "protos")]
    line = user_error(capsys, [*build, "--classes", "cat", "cat"])
    assert "--classes: names must be non-empty and distinct" in line
    line = user_error(capsys, [*build, "--classes", "background", "cat"])
    assert "'background' is always label 0" in line
    line = user_error(capsys, [*build, "--classes", "cat", "method.kmeans_kk=3"])
    assert "method.kmeans_kk" in line and "method.kmeans_k" in line


def test_eval_user_errors_are_one_line(tmp_path, capsys):
    demo = ["eval", "demo_correspondence", "backbone=tiny", "logger=none"]
    line = user_error(capsys, [*demo, f"resume={tmp_path}"])
    assert f"resume={str(tmp_path)!r} is not a run folder" in line
    taken = tmp_path / "file"
    taken.write_text("")
    line = user_error(capsys, [*demo, f"output_dir={taken}"])
    assert f"output_dir={str(taken)!r} is a file; expected a folder path" in line
    line = user_error(capsys, [*demo, f"output_dir={tmp_path / 'r'}", "trainer.precision=99"])
    assert line.startswith("sdzero: error: trainer: ") and "Precision 99" in line
    line = user_error(capsys, [*demo, f"output_dir={tmp_path / 's'}", "backbone.arch=sd3"])
    assert "backbone.arch='sd3' is not a Stable Diffusion architecture" in line
    line = user_error(capsys, ["eval", "spair_ldm", f"data.root={tmp_path}", "data.split=tst"])
    assert "data.split: SPair-71k split must be one of ('trn', 'val', 'test'), got 'tst'" in line


@pytest.mark.parametrize(
    ("target", "argv"),
    [
        ("sdzero.runs.run_eval", ["eval", "demo_correspondence"]),
        ("sdzero.correspondence.cli.match_images", ["match", "a.png", "b.png", "--points", "1,2"]),
        ("sdzero.segmentation.api.segment_file", ["segment", "a.png", "--classes", "cat"]),
        (
            "sdzero.segmentation.api.build_prototype_cache",
            ["prototypes", "build", "--out", "p", "--classes", "cat"],
        ),
    ],
)
@pytest.mark.parametrize("kind", [RuntimeError, ValueError])
def test_an_unexpected_error_keeps_its_traceback(monkeypatch, capsys, target, argv, kind):
    """Only user errors become one line: a bug (even a plain ValueError) propagates."""

    def bug(*args, **kwargs):
        raise kind("a bug")

    monkeypatch.setattr(target, bug)
    with pytest.raises(kind, match="a bug"):
        main(argv)
    assert "sdzero: error" not in capsys.readouterr().err


def test_the_command_exits_2_with_one_line_and_no_traceback(image):
    from cli_runs import sdzero

    res = sdzero("match", str(image), str(image), "--points", "40,5", *MATCH, timeout=300)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.strip().splitlines() == [
        f"sdzero: error: query point [40.0, 5.0] lies outside the 32x32 (w x h) source image "
        f"{str(image)!r}; expected 0 <= x <= 32 and 0 <= y <= 32"
    ]


def test_every_user_error_derives_from_one_class():
    from datamodules.files import DatasetFormatError, DatasetNotFoundError
    from sdzero.backbones.errors import WeightsFormatError, WeightsNotFoundError
    from sdzero.config import ConfigError
    from sdzero.errors import InputError, MissingDependencyError, MissingFileError, UserError

    errors = (ConfigError, InputError, MissingFileError, DatasetFormatError, DatasetNotFoundError)
    errors += (WeightsFormatError, WeightsNotFoundError, MissingDependencyError)
    assert all(issubclass(e, UserError) for e in errors)
    # callers that catch the builtin kinds keep working
    assert issubclass(ConfigError, ValueError) and issubclass(DatasetFormatError, ValueError)
    assert issubclass(WeightsFormatError, ValueError) and issubclass(InputError, ValueError)
    assert issubclass(DatasetNotFoundError, FileNotFoundError)
    assert issubclass(WeightsNotFoundError, FileNotFoundError)
    assert issubclass(MissingFileError, FileNotFoundError)
    assert issubclass(MissingDependencyError, ImportError)


def test_ovdiff_folder_keys_fail_before_any_model_loads(tmp_path, monkeypatch):
    from sdzero.config import ConfigError
    from sdzero.segmentation.module import OVDiffModule

    def no_models(self):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(OVDiffModule, "_components", no_models)
    cases = [
        (dict(prototype_cache="run"), None, r"method\.prototype_cache=run needs a run folder"),
        (dict(support_folder="auto"), None, r"method\.support_folder=auto takes the datamodule"),
        (dict(support_folder=str(tmp_path / "nope")), None, r"support_folder=.*is not a folder"),
    ]
    for settings, root, pattern in cases:
        module = OVDiffModule({}, mask_proposer="attention", **settings)
        with pytest.raises(ConfigError, match=pattern):
            module.build_prototypes(["cat"], support_root=root)


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


def test_version_and_the_options_listed_in_help(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("sdzero ")
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "demo_correspondence" in out and "method=: " in out and "ldm_corr" in out


def test_pixel_needs_explain(tmp_path, capsys):
    image = tmp_path / "img.png"
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(image)
    line = user_error(capsys, ["segment", str(image), "--classes", "cat", "--pixel", "1,1"])
    assert "--pixel X,Y names the pixel --explain OUT.png explains" in line
