"""The bad inputs a new user tries: each is one line (``sdzero: error: ...``, exit 2) naming the key,
argument or file and what was expected, raised before any model is built."""

import json

import numpy as np
import pytest
from PIL import Image

from sdzero.cli import main

CORR = ["eval", "demo_correspondence", "logger=none"]
SEG = ["eval", "demo_segmentation", "logger=none"]
TRAIN = ["train", "demo_train", "logger=none"]
MATCH = ["backbone=tiny", "method.image_size=64", "method.steps=1"]

# (command line, a fragment of the one error line); {tmp}, {image}, {text}, {trunc}, {file} and
# {folder} are filled in per test
CASES = [
    # method keys: types, ranges, and what the named architecture has
    (CORR + ["method.steps=abc"], "method.steps must be an integer, got 'abc'"),
    (CORR + ["method.heads=4"], "method.heads must be a list of an integer or null, got 4"),
    (CORR + ["method.lr=[1,2]"], "method.lr must be a number, got [1, 2]"),
    (CORR + ["method.lr=-1"], "method.lr must be a finite number > 0, got -1.0"),
    (CORR + ["method.sigma=0"], "method.sigma must be a finite number > 0, got 0.0"),
    (CORR + ["method.steps=-1"], "method.steps must be >= 0, got -1"),
    (CORR + ["method.num_embeddings=0"], "method.num_embeddings must be >= 1, got 0"),
    (CORR + ["method.image_size=100"], "method.image_size must be a multiple of 64, got 100"),
    (CORR + ["method.token=[1]"], "method.token must be an integer, got [1]"),
    (CORR + ["method.opt_timestep=1000"], "method.opt_timestep must lie in 0..999, got 1000"),
    (CORR + ["method.layers=[]"], "method.layers must name at least one cross-attention layer"),
    (
        CORR + ["method.layers=[7,99]"],
        "method.layers: cross-attention layer index 99 is out of range for backbone.arch='tiny', "
        "which has 16 cross-attention layers (0..15)",
    ),
    (CORR + ["method.heads=[4,9]"], "method.heads: head index 9 is out of range"),
    (CORR + ["method.heads=[4,4]"], "method.heads must be null or distinct head indices >= 0"),
    (CORR + ["method.noise=abc"], "method.noise must be 'uniform' or 'gaussian', got 'abc'"),
    (CORR + ["method.pck_alphas=[]"], "method.pck_alphas must be distinct numbers > 0, got []"),
    (CORR + ["method.stepz=1"], "unknown config key 'method.stepz'"),
    (CORR + ["protocol=bogus"], "unknown protocol 'bogus'"),
    (CORR + ["backbone.arch=sd3"], "backbone.arch='sd3' is not a Stable Diffusion architecture"),
    (CORR + ["logger=bogus"], "no config 'bogus' in group 'logger'"),
    (SEG + ["method.extractors=[bogus]"], "method.extractors must be distinct names among"),
    (SEG + ["method.mask_proposer=bogus"], "method.mask_proposer must be one of"),
    (SEG + ["method.kmeans_k=0"], "method.kmeans_k must be >= 1, got 0"),
    (SEG + ["method.clip_filter=maybe"], "method.clip_filter must be true/false, got 'maybe'"),
    # data keys: typed by the datamodule's signature
    (CORR + ["data.limit=abc"], "data.limit must be an integer or null, got 'abc'"),
    (CORR + ["data.limit=0"], "data.limit must be a positive integer or null, got 0"),
    (CORR + ["data.num_pairs=abc"], "data.num_pairs must be an integer, got 'abc'"),
    (CORR + ["data.on_bad_sample=maybe"], "data.on_bad_sample must be one of ['error', 'skip']"),
    (SEG + ["data.image_size=abc"], "data.image_size must be an integer, got 'abc'"),
    # top-level keys, trainer, run folders
    (CORR + ["seed=abc"], "seed must be an integer, got 'abc'"),
    (CORR + ["visuals=-1"], "visuals must be an integer >= 0, got -1"),
    (CORR + ["trainer.devices=abc"], "trainer: "),
    (CORR + ["trainer.precision=99"], "trainer: "),
    (CORR + ["trainer.accelerator=tpu"], "trainer: "),
    (
        TRAIN + ["trainer.max_epochs=abc"],
        "trainer.max_epochs must be an integer or null, got 'abc'",
    ),
    (TRAIN + ["method.lr=abc"], "method.lr must be a number, got 'abc'"),
    (CORR + ["output_dir={file}"], "is a file; expected a folder path"),
    (CORR + ["output_dir={file}/run"], "cannot write the run folder"),
    (CORR + ["resume={tmp}"], "is not a run folder (no config.yaml in it)"),
    (["eval", "no_such_experiment"], "unknown experiment 'no_such_experiment'"),
    # command-line inputs: images, points, output paths
    (["match", "{image}", "{image}", "--points", "nan,3", *MATCH], "expected finite numbers X,Y"),
    (["match", "{image}", "{image}", "--points", "inf,3", *MATCH], "expected finite numbers X,Y"),
    (["match", "{image}", "{image}", "--points", "40,5", *MATCH], "lies outside the 32x32"),
    (["match", "{folder}", "{image}", "--points", "1,2", *MATCH], "is a folder; expected an image"),
    (["match", "{text}", "{image}", "--points", "1,2", *MATCH], "cannot be read as an image"),
    (["match", "{trunc}", "{image}", "--points", "1,2", *MATCH], "cannot be read as an image"),
    (
        ["match", "{image}", "{image}", "--points", "1,2", "--viz", "{file}/v.png", *MATCH],
        "--viz '{file}/v.png': '{file}' is a file, not a folder",
    ),
    (
        ["match", "{image}", "{image}", "--points", "1,2", "--viz", "{tmp}", *MATCH],
        "--viz '{tmp}' is a folder; expected a file path",
    ),
    (["segment", "{folder}", "--classes", "cat"], "is a folder; expected an image file"),
    (["segment", "{trunc}", "--classes", "cat"], "cannot be read as an image"),
    (["segment", "{image}", "--classes", ""], "--classes: names must be non-empty and distinct"),
    (["segment", "{image}", "--classes", "cat", "--out", "{tmp}"], "--out '{tmp}' is a folder"),
    (
        ["segment", "{image}", "--classes", "cat", "--overlay", "{file}/o.png"],
        "--overlay '{file}/o.png': '{file}' is a file, not a folder",
    ),
    (["prototypes", "build", "--out", "{file}", "--classes", "cat"], "--out '{file}' is a file"),
    (["report", "{file}"], "is a file; expected a run folder"),
    (["report", "{tmp}/nope"], "no such folder"),
]


@pytest.fixture
def places(tmp_path):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes((tmp_path / "full.png").read_bytes()[:200])
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    afile = tmp_path / "afile"
    afile.write_text("")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    return {
        "tmp": str(tmp_path),
        "image": str(image),
        "trunc": str(trunc),
        "text": str(text),
        "file": str(afile),
        "folder": str(folder),
    }


@pytest.mark.parametrize(("argv", "fragment"), CASES, ids=[" ".join(c[0][:4]) for c in CASES])
def test_a_bad_input_is_one_line_before_any_model(
    argv, fragment, places, no_network_built, tmp_path, capsys
):
    argv = [a.format(**places) for a in argv]
    if argv[0] in ("eval", "train") and not any(a.startswith("output_dir") for a in argv):
        argv.append(f"output_dir={tmp_path / 'run'}")
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("sdzero: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert fragment.format(**places) in lines[0]
    assert out == ""
    assert not (tmp_path / "run").exists()  # no run folder is left behind


def test_a_record_of_the_wrong_types_is_dropped_and_redone(tmp_path, caplog):
    """A well-formed JSON record whose fields have the wrong types is not taken as finished (the
    sample is redone) and is named in the log; a skip record is kept apart."""
    from sdzero.callbacks import finished_records
    from sdzero.tasks.correspondence import CorrespondenceTask, Scoring

    task = CorrespondenceTask(
        Scoring("bbox-target", "original", (0.1,), True, 512, "stretch"), ["a"]
    )
    good = {
        "index": 0,
        "id": "p0",
        "category": "a",
        "src_kps": [[1.0, 2.0]],
        "trg_kps": [[3.0, 4.0]],
        "pred_kps": [[3.0, 4.0]],
        "src_size": [8, 8],
        "trg_size": [8, 8],
        "threshold_size": 8.0,
    }
    bad = [
        {**good, "index": 1, "pred_kps": "abc"},
        {**good, "index": 2, "pred_kps": [[1.0, 2.0], [3.0, 4.0]]},  # two for one source point
        {**good, "index": 3, "threshold_size": "8"},
        {**good, "index": 4, "src_size": [8.5, 8]},
        {**good, "index": 5, "category": 3},
        {**good, "index": True},
    ]
    skip = {"index": 6, "id": "p6", "skipped": "image file 'x.jpg' cannot be read"}
    folder = tmp_path / "predictions"
    folder.mkdir()
    lines = [json.dumps(r) for r in (good, *bad, skip)]
    (folder / "rank0.jsonl").write_text("\n".join(lines) + "\n")
    finished, skipped = finished_records(folder, task)
    assert sorted(finished) == [0] and sorted(skipped) == [6]
    assert caplog.text.count("wrong type") == 5 and "without an integer index" in caplog.text


def test_a_corrupt_image_inside_a_dataset_is_named_or_skipped(tmp_path, capsys):
    """A truncated JPEG in SPair-71k: by default the run stops at that pair with one line naming
    the file and the key that skips it (the pair before it keeps its record); with
    ``data.on_bad_sample=skip`` the pair is recorded as skipped, ``metrics.json`` counts it, the
    other pairs are scored, and the metrics recompute from the records."""
    from correspondence_files import write_spair

    from sdzero.runs import recompute_metrics

    root = write_spair(tmp_path)
    bad = root / "JPEGImages" / "dog" / "2009_000001.jpg"  # the source of the 2nd pair only
    bad.write_bytes(bad.read_bytes()[:60])
    run = ["eval", "spair_dift", f"data.root={tmp_path}", "backbone=tiny", "logger=none"]
    run += ["method.image_size=64", "method.ensemble_size=1", "trainer=cpu"]
    assert main([*run, f"output_dir={tmp_path / 'a'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "sdzero: error" in line]
    assert len(err) == 1 and str(bad) in err[0] and "data.on_bad_sample=skip" in err[0]
    records = (tmp_path / "a" / "predictions" / "rank0.jsonl").read_text().splitlines()
    assert [json.loads(r)["index"] for r in records] == [0]

    assert main([*run, f"output_dir={tmp_path / 'b'}", "data.on_bad_sample=skip"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert metrics["skipped_samples"] == 1 and metrics["num_pairs"] == 2
    lines = (tmp_path / "b" / "predictions" / "rank0.jsonl").read_text().splitlines()
    skipped = [json.loads(r) for r in lines if "skipped" in json.loads(r)]
    assert [r["index"] for r in skipped] == [1] and str(bad) in skipped[0]["skipped"]
    again = recompute_metrics(tmp_path / "b")
    recorded = {k: v for k, v in metrics.items() if not k.startswith("seconds")}
    assert recorded.pop("warning").startswith("RANDOM WEIGHTS") and recorded == again
