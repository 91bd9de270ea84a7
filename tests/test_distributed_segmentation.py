"""Segmentation: concurrent prototype-cache builders, offline W&B (2 processes and resume: the method
contract suite, tests/test_method_contract.py)."""

import hashlib
import json
import subprocess
import sys

import pytest
from wandb_offline import artifact_types, logged_values

from datamodules.synthetic_segmentation import write_synthetic_voc
from sdzero.cli import main

COMMON = ["data.num_images=5", "logger=none", "trainer.enable_progress_bar=false"]  # odd count


def test_concurrent_prototype_builds_leave_a_valid_cache(tmp_path):
    data = write_synthetic_voc(tmp_path / "data", num_images=1, classes=2, image_size=64)
    classes = sorted(p.name for p in (data / "support").iterdir())
    cache = tmp_path / "cache"
    argv = [
        "prototypes",
        "build",
        "--classes",
        *classes,
        "--out",
        str(cache),
        "backbone=tiny",
        "method.extractors=[colour]",
        f"method.support_folder={data / 'support'}",
        "method.mask_proposer=saliency",
        "method.clip_filter=false",
        "method.kmeans_k=4",
    ]
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PATH": ""}
    args = [sys.executable, "-m", "sdzero.cli", *argv]
    procs = [
        subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    files = sorted(cache.glob("*.pt"))
    assert len(files) == len(classes)  # one file per class, no torn temporaries left
    assert not list(cache.glob(".*.tmp"))
    summaries = [json.loads(o[0][o[0].index("{") :]) for o in outs]
    assert summaries[0]["classes"] == summaries[1]["classes"]
    for path in files:  # each file is whole: its embedded SHA-256 matches its payload
        data = path.read_bytes()
        magic = b"SDZPROTO1\n"
        assert data.startswith(magic)
        digest, payload = data[len(magic) : len(magic) + 64], data[len(magic) + 64 :]
        assert hashlib.sha256(payload).hexdigest().encode() == digest
    # a third run (here, in this process) finds everything cached: the files are untouched
    stamps = [p.stat().st_mtime_ns for p in files]
    assert main(argv) == 0
    assert [p.stat().st_mtime_ns for p in files] == stamps


def test_offline_wandb_logs_miou_tables_and_the_prototype_artifact(offline_wandb):
    out = offline_wandb["segmentation"]
    final = json.loads((out / "metrics.json").read_text())
    logged = logged_values(out)
    assert float(logged["miou"]) == pytest.approx(final["miou"])
    assert logged["per_class_iou/_type"] == '"table-file"'
    assert "prototypes" in artifact_types(out)
