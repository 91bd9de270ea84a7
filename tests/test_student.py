"""The student (method=student) trained by `sdzero train` on pseudo-labels.

Known answer: synthetic transformed pairs (parts of fixed colours, scaled and moved, on other
backgrounds) and a test extractor whose 7 channels per cell are its colour and its place in the
frame. An untrained head matches mostly by place (the same spot of the target: wrong, the object
moved); the trained head must learn to match by colour. A teacher's records label the training
pairs with the true targets plus 1 px of noise and one outlier in six (anywhere in the target
image); place cannot fit the outliers (it is the same in every image), so they only add noise. The
student trained on them must beat the untrained head by a wide margin and come close to the same
student trained on the noise-free labels (the noise-free teacher's). Measured on 5 synthetic seeds
(the loop written out, 32 steps): untrained 7-31, noise-free 77-86, noisy 69-88 PCK@0.1, the noisy
student at most 9.6 points below the noise-free one.

The loop: the loss falls, best.ckpt reloads to the same predictions, a run stopped half-way and
resumed ends with the uninterrupted run's weights, 2-process DDP equals 1 process with the same
global batch; checkpoints hold the head alone and the frozen features go through the cache once.
"""

import csv
import json

import pytest
import torch
import torch.nn.functional as F
from cli_runs import DDP2, sdzero
from label_runs import teacher_run
from torch import nn

from datamodules.synthetic_correspondence import write_synthetic_spair
from sdzero.config import compose
from sdzero.correspondence.student import Student
from sdzero.correspondence.student_features import PARTS, register_part
from sdzero.records import read_records
from sdzero.runs import run_eval, run_train
from sdzero.seeding import keyed_generator

SIGMA = 1.0  # px of label noise
OUTLIER_EVERY = 6  # every sixth label an outlier


class ColourAndPlace(nn.Module):
    """Per cell of a ``colour_grid`` grid: its mean colour minus 0.5 (3 channels) and its place in
    the frame, ``2 sin`` and ``2 cos`` of x and of y over half a period (4 channels)."""

    channels = 7
    random_weights = False

    def __init__(self, settings, backbone, seed):
        super().__init__()
        self.grid = settings.colour_grid

    def forward(self, images, names, category):
        colour = F.adaptive_avg_pool2d(images, self.grid) - 0.5
        t = (torch.arange(self.grid) + 0.5) / self.grid * torch.pi
        y, x = torch.meshgrid(t, t, indexing="ij")
        place = 2 * torch.stack([x.sin(), x.cos(), y.sin(), y.cos()]).to(colour)
        return torch.cat([colour, place.expand(len(images), -1, -1, -1)], dim=1)


if "colour_and_place" not in PARTS:
    register_part("colour_and_place", ColourAndPlace)

STUDENT = [
    "method=student",
    "backbone=tiny",
    "trainer=cpu",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "visuals=0",
    "method.image_size=64",
    "method.backbones=[colour_and_place]",
    "method.colour_grid=32",
    "method.head_channels=32",
    "method.head_layers=0",
    "method.descriptor_dims=16",
    "method.lr=0.05",
    "method.weight_decay=0.0",
    "trainer.log_every_n_steps=1",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spair")
    return write_synthetic_spair(
        folder, 16, 64, seed=5, kind="transform", num_train_pairs=64, num_val_pairs=4
    )


def _noisy(sample):
    """The true targets plus N(0, SIGMA px); every sixth label an outlier anywhere in the image."""
    generator = keyed_generator(11, int(sample["index"]))
    pred = sample["trg_kps"] + SIGMA * torch.randn(sample["trg_kps"].shape, generator=generator)
    w, h = sample["trg_size"]
    for k in range(0, len(pred), OUTLIER_EVERY):
        pred[k] = torch.rand(2, generator=generator) * torch.tensor([float(w), float(h)])
    return pred


@pytest.fixture(scope="module")
def teacher(root, tmp_path_factory):
    return teacher_run(tmp_path_factory.mktemp("teacher") / "run", root, _noisy)


def _data(root, teacher, labels="pseudo"):
    keys = ["data=spair_pseudo_labels", f"data.root={root}", f"data.runs=[{teacher}]"]
    return keys + [f"data.labels={labels}", "data.use_keypoints=true", "data.batch_size=8"]


def _train(out, root, teacher, *extra, labels="pseudo"):
    overrides = [*STUDENT, *_data(root, teacher, labels), f"output_dir={out}", *extra]
    return run_train(compose(None, overrides))


def _losses(run_dir, folder="csv"):
    with open(run_dir / folder / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    by_epoch = {}
    for row in rows:
        by_epoch.setdefault(int(row["epoch"]), []).append(float(row["train/loss"]))
    return [sum(v) / len(v) for _, v in sorted(by_epoch.items())]


def _head(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _records(run_dir):
    return {
        r["index"]: r["pred_kps"] for r in read_records(run_dir / "predictions" / "rank0.jsonl")
    }


EPOCHS = 4


@pytest.fixture(scope="module")
def noisy(root, teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy") / "run"
    return out, _train(out, root, teacher, f"trainer.max_epochs={EPOCHS}")


def test_student_on_noisy_labels_beats_the_untrained_head_and_nears_the_clean_one(
    root, teacher, noisy, tmp_path
):
    out, trained = noisy
    clean = _train(
        tmp_path / "clean", root, teacher, f"trainer.max_epochs={EPOCHS}", labels="ground_truth"
    )
    untrained = run_eval(
        compose(None, [*STUDENT, *_data(root, teacher), f"output_dir={tmp_path / 'untrained'}"])
    )
    got = {
        k: m["pck"]["0.1"]
        for k, m in (("untrained", untrained), ("noisy", trained), ("clean", clean))
    }
    print("student PCK@0.1:", got)
    assert got["noisy"] >= got["untrained"] + 40, got
    assert got["noisy"] >= got["clean"] - 12, got
    assert untrained["warning"] and "warning" not in trained  # an untrained head is flagged


def test_the_loss_falls_and_the_checkpoint_holds_the_head_and_reloads(
    root, teacher, noisy, tmp_path
):
    out, metrics = noisy
    losses = _losses(out)
    assert len(losses) == EPOCHS and losses[-1] < 0.75 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    state = _head(out / "checkpoints" / "best.ckpt")
    assert state and all(k.startswith("head.") for k in state)
    best = out / "checkpoints" / "best.ckpt"
    again = run_eval(
        compose(
            None,
            [
                *STUDENT,
                *_data(root, teacher),
                f"output_dir={tmp_path / 'eval'}",
                f"method.checkpoint={best}",
            ],
        )
    )
    assert _records(tmp_path / "eval") == _records(out)
    assert again["pck"] == metrics["pck"]


class Killed(RuntimeError):
    """Stands for the process dying at the end of epoch 2, before its checkpoint is written."""


def test_a_killed_fit_resumed_ends_with_the_uninterrupted_weights(
    root, teacher, noisy, tmp_path, monkeypatch
):
    reference, _ = noisy
    out = tmp_path / "resumed"

    def die_in_epoch_2(module):
        if module.current_epoch == 1:  # ModelCheckpoint saves after this hook: epoch 2 is lost
            raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(Student, "on_train_epoch_end", die_in_epoch_2)
        with pytest.raises(Killed):
            _train(out, root, teacher, f"trainer.max_epochs={EPOCHS}")
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 0
    overrides = [*STUDENT, *_data(root, teacher), f"resume={out}", f"trainer.max_epochs={EPOCHS}"]
    run_train(compose(None, overrides))
    ref, got = (
        _head(reference / "checkpoints" / "last.ckpt"),
        _head(out / "checkpoints" / "last.ckpt"),
    )
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert _records(out) == _records(reference)


def _affine(sample):
    """The pair's true map at every source point: the least-squares affine fit of its annotated
    keypoints (a transformed pair is the object scaled and moved)."""
    known = ~torch.isnan(sample["trg_kps"]).any(1)
    src, trg = sample["src_kps"][known].double(), sample["trg_kps"][known].double()
    ones = torch.ones(len(src), 1, dtype=torch.double)
    fit = torch.linalg.lstsq(torch.cat([src, ones], 1), trg).solution
    points = sample["src_kps"].double()
    return (torch.cat([points, torch.ones(len(points), 1, dtype=torch.double)], 1) @ fit).float()


def test_two_processes_train_the_weights_of_one_and_share_the_feature_cache(root, tmp_path):
    # grid labels only: every pair has 9, so each rank's mean loss weighs as the global batch's
    grid = teacher_run(tmp_path / "grid", root, _affine, grid=3)
    cache = tmp_path / "features"
    common = [
        *(o for o in STUDENT if not o.startswith("method.backbones")),
        "method.backbones=[colour]",
        f"data.root={root}",
        f"data.runs=[{grid}]",
        "trainer.max_epochs=2",
        "trainer.gradient_clip_val=0.5",
        "data.train_limit=32",
        "data.limit=4",
        f"method.feature_cache={cache}",
    ]
    one_process = [*common, "data.batch_size=8", f"output_dir={tmp_path / 'one'}"]
    run_train(compose("distill_spair", one_process))
    entries = sorted(p.name for p in cache.glob("*.pt"))
    assert len(entries) == 32 * 2 + 4 * 2 + 4 * 2  # every train, val and test image once
    res = sdzero(
        "train",
        "distill_spair",
        *common,
        *DDP2,
        "data.batch_size=4",
        f"output_dir={tmp_path / 'two'}",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in cache.glob("*.pt")) == entries  # read, not recomputed
    one = _head(tmp_path / "one" / "checkpoints" / "last.ckpt")
    two = _head(tmp_path / "two" / "checkpoints" / "last.ckpt")
    assert all(torch.allclose(one[k], two[k], atol=1e-5, rtol=1e-4) for k in one)
    losses = _losses(tmp_path / "two")
    assert len(losses) == 2 and losses[1] < losses[0]  # it trained
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert metrics["num_pairs"] == 4  # the test split's head, sharded without repeats
