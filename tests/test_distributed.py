"""Resume after SIGKILL, run-folder refusals, offline W&B: through the real CLI (2 processes and
resume for every method: tests/test_method_contract.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from cli_runs import eval_ok, metrics, sdzero_env
from wandb_offline import logged_values

from sdzero.config import compose
from sdzero.errors import ConfigError
from sdzero.records import read_records
from sdzero.run_folder import RunFolder
from sdzero.runs import run_eval

COMMON = [
    "data.num_pairs=3",  # odd: 2 ranks get 2 + 1 samples
    "method.steps=2",
    "method.num_embeddings=1",
    "method.inference_crops=4",
    "logger=none",
    "trainer.enable_progress_bar=false",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    run_eval(compose("demo_correspondence", [f"output_dir={out}", *COMMON]))
    return out


def test_sigkill_then_resume_ends_with_the_uninterrupted_metrics(reference, tmp_path, caplog):
    out = tmp_path / "killed"
    env = sdzero_env()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdzero.cli",
            "eval",
            "demo_correspondence",
            f"output_dir={out}",
            *COMMON,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    records = out / "predictions" / "rank0.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(read_records(records))) < 1:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {r["index"] for r in read_records(records)}
    assert 1 <= len(finished) <= 3
    if len(finished) < 3:  # a record cut off by the kill: detected, redone, never counted
        with open(records, "a") as f:
            f.write('{"index": 2, "id": "torn", "pred_k')
    with caplog.at_level("INFO"):  # the resume in this process (the kill needed a subprocess)
        run_eval(compose("demo_correspondence", [f"resume={out}", *COMMON]))
    lines = records.read_text().splitlines()
    assert all(line.endswith("}") for line in lines)  # the torn tail was cut before appending
    assert len(lines) == 3  # the finished samples were not recomputed
    assert f"{3 - len(finished)} samples evaluated" in caplog.text
    assert metrics(out) == metrics(reference)


def test_fresh_run_refuses_a_folder_with_records(reference):
    # refused when the run folder is planned, before any data or model (the CLI prints it as one line)
    with pytest.raises(ConfigError, match="already holds prediction records"):
        RunFolder(compose("demo_correspondence", [f"output_dir={reference}", *COMMON]))


def test_resume_with_other_settings_is_refused(reference):
    with pytest.raises(ConfigError, match="seed: 0 vs 9"):
        RunFolder(compose("demo_correspondence", [f"resume={reference}", "seed=9", *COMMON]))


def test_offline_wandb_run_holds_the_final_metrics(offline_wandb):
    out = offline_wandb["correspondence"]
    final = json.loads((out / "metrics.json").read_text())
    logged = logged_values(out)
    for alpha, value in final["pck"].items():
        assert float(logged[f"pck/{alpha}"]) == pytest.approx(value)
    assert logged["per_category/_type"] == '"table-file"'
    assert logged["visuals/_type"] == '"images/separated"'


def test_more_ranks_than_samples_give_the_one_process_metrics(tmp_path):
    """3 ranks, 2 pairs: the idle rank runs one padding sample and contributes nothing."""
    common = ["data.num_pairs=2", "logger=none", "trainer.enable_progress_bar=false"]
    run_eval(compose("demo_train", [f"output_dir={tmp_path / 'one'}", *common]))
    ddp = ["trainer.strategy=ddp", "trainer.devices=3", "trainer.accelerator=cpu"]
    eval_ok("demo_train", tmp_path / "three", *common, *ddp)
    counts = {
        p.name: len(list(read_records(p))) for p in (tmp_path / "three" / "predictions").glob("*")
    }
    assert counts == {"rank0.jsonl": 1, "rank1.jsonl": 1, "rank2.jsonl": 0}
    assert metrics(tmp_path / "three") == metrics(tmp_path / "one")
