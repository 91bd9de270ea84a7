"""`sdzero train`: Lightning fit of the small conv matcher on synthetic shifted pairs, checkpoints,
resume, evaluation of the best checkpoint, DDP.

Measured (demo_train, 4 epochs, 32 train / 8 val pairs of 64 px): train loss 5.5 -> ~1, test
PCK@0.1 96% (a uniform guess within 0.1 * 64 px: 3%).
"""

import csv
import json

import pytest
import torch
from cli_runs import DDP2, sdzero

from sdzero.config import compose
from sdzero.errors import ConfigError
from sdzero.records import read_records
from sdzero.runs import run_eval, run_train

QUIET = ["trainer.enable_progress_bar=false", "visuals=0"]


def _train(out, *overrides):
    return run_train(compose("demo_train", [f"output_dir={out}", *QUIET, *overrides]))


def _epoch_losses(run_dir, folder="csv"):
    """Mean train loss per epoch from the CSV log."""
    with open(run_dir / folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    by_epoch = {}
    for row in rows:
        if row.get("train/loss"):
            by_epoch.setdefault(int(row["epoch"]), []).append(float(row["train/loss"]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _records(run_dir):
    return {r["index"]: r for r in read_records(run_dir / "predictions" / "rank0.jsonl")}


@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    return out, _train(out, "trainer.max_epochs=4")


def test_fit_lowers_the_loss_and_evaluates_the_best_checkpoint(four_epochs):
    out, metrics = four_epochs
    losses = _epoch_losses(out)
    assert len(losses) == 4 and losses[-1] < 0.5 * losses[0]
    assert (out / "checkpoints" / "best.ckpt").is_file()
    assert (out / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["num_pairs"] == 4 and metrics["pck"]["0.1"] > 50  # chance: 3%
    stamp = json.loads((out / "evaluated.json").read_text())
    assert stamp["checkpoint"] == "checkpoints/best.ckpt"


def test_resume_continues_from_the_last_checkpoint_exactly(four_epochs, tmp_path):
    reference, ref_metrics = four_epochs
    out = tmp_path / "resumed"
    first = _train(out, "trainer.max_epochs=2")
    old_records = _records(out)
    resumed = run_train(compose("demo_train", [f"resume={out}", *QUIET, "trainer.max_epochs=4"]))
    assert len(_epoch_losses(out)) == 2  # the first part's log is kept ...
    assert len(_epoch_losses(out / "csv" / "resumed-1", "")) == 2  # ... beside the second's
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3 and last["global_step"] == 16  # 4 epochs of 4 batches
    ref, got = (
        _weights(reference / "checkpoints" / "last.ckpt"),
        _weights(out / "checkpoints" / "last.ckpt"),
    )
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    timing = {"seconds_per_pair"}
    assert {k: v for k, v in resumed.items() if k not in timing} == {
        k: v for k, v in ref_metrics.items() if k not in timing
    }
    # the evaluation of the 2-epoch weights was kept aside, not reused for the new weights
    (stale,) = (out / "stale").iterdir()
    assert json.loads((stale / "metrics.json").read_text())["pck"] == first["pck"]
    assert _records(stale) == old_records


def test_eval_of_the_checkpoint_reproduces_the_train_evaluation(four_epochs, tmp_path):
    reference, metrics = four_epochs
    best = reference / "checkpoints" / "best.ckpt"
    got = run_eval(
        compose(
            "demo_train", [f"output_dir={tmp_path / 'eval'}", *QUIET, f"method.checkpoint={best}"]
        )
    )
    assert got["pck"] == metrics["pck"]
    assert _records(tmp_path / "eval") == _records(reference)


def test_train_refuses_methods_without_training_and_data_without_a_split(tmp_path):
    with pytest.raises(ConfigError, match="cannot be trained"):
        run_train(compose("demo_correspondence", [f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(ConfigError, match="data.train_split"):
        _train(tmp_path / "b", "data.train_split=null")
    with pytest.raises(ConfigError, match="method.checkpoint"):
        run_eval(
            compose(
                "demo_train", [f"output_dir={tmp_path / 'c'}", "method.checkpoint=/nonexistent"]
            )
        )


def test_two_processes_train_with_synced_gradients(tmp_path):
    out = tmp_path / "ddp"
    res = sdzero("train", "demo_train", f"output_dir={out}", *QUIET, *DDP2, "trainer.max_epochs=3")
    assert res.returncode == 0, res.stderr[-3000:]
    losses = _epoch_losses(out)
    assert len(losses) == 3 and losses[-1] < losses[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_pairs"] == 4  # the test split, sharded without repeats
    counts = {p.name: len(list(read_records(p))) for p in (out / "predictions").glob("*.jsonl")}
    assert counts == {"rank0.jsonl": 2, "rank1.jsonl": 2}
