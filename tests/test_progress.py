"""Progress reports: the counts each long piece of work reports, and where the reports go."""

import logging
import types

import pytest
import torch
import torch.nn.functional as F

from datamodules.synthetic_segmentation import write_synthetic_voc
from sdzero import progress as progress_module
from sdzero.correspondence.fit_config import FitConfig
from sdzero.correspondence.fitting import PromptCorrespondence
from sdzero.progress import Progress, clock, observe, progress
from sdzero.segmentation.features import ColourExtractor
from sdzero.segmentation.inference import PrototypeBank, Segmenter
from sdzero.segmentation.prototypes import PrototypeCache, build_prototypes
from sdzero.segmentation.support import FolderSupport, sample_support_set


def _finals(ticks, prefix):
    """(desc, done, total) of the last tick of each report whose desc starts with ``prefix``."""
    last = {}
    for tick in ticks:
        if tick.desc.startswith(prefix):
            last[tick.desc] = (tick.desc, tick.done, tick.total)
    return list(last.values())


def test_log_mode_writes_counts_elapsed_and_eta(monkeypatch, caplog):
    monkeypatch.setenv("SDZERO_PROGRESS", "log")
    monkeypatch.setenv("SDZERO_PROGRESS_EVERY", "0")  # a line at every tick
    now = [100.0]
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: now[0])
    with caplog.at_level(logging.INFO, "sdzero.progress"), progress("work", 4, "items") as p:
        now[0] = 110.0
        p.advance()  # 1 item in 10 s: 3 left, 30 s
        p.note("first done")
        now[0] = 130.0
        p.advance(2)  # 3 items in 30 s: 1 left, 10 s
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "work: 1/4 items (25%), 0:10 elapsed, ETA 0:30",
        "work: 3/4 items (75%), 0:30 elapsed, ETA 0:10 [first done]",
        "work: done in 0:30",
    ]
    assert clock(3725) == "1:02:05" and clock(59.6) == "1:00"


def test_log_mode_is_quiet_between_intervals_and_off_is_silent(monkeypatch, caplog):
    monkeypatch.setenv("SDZERO_PROGRESS_EVERY", "30")
    for mode in ("log", "off"):
        monkeypatch.setenv("SDZERO_PROGRESS", mode)
        with (
            caplog.at_level(logging.INFO, "sdzero.progress"),
            observe() as ticks,
            progress("quick", 3) as p,
        ):
            p.advance(3)
        assert caplog.records == [] and [t.done for t in ticks] == [3]


def test_default_mode_is_log_lines_off_a_terminal_and_non_zero_ranks_do_not_report(monkeypatch):
    monkeypatch.delenv("SDZERO_PROGRESS", raising=False)
    monkeypatch.setattr(progress_module.sys.stderr, "isatty", lambda: False)
    assert Progress("work", 1).mode == "log"
    fake = types.SimpleNamespace(rank_zero_only=types.SimpleNamespace(rank=1))
    monkeypatch.setitem(progress_module.sys.modules, "lightning_fabric.utilities.rank_zero", fake)
    assert Progress("work", 1).mode == "off"
    fake.rank_zero_only.rank = 0
    assert Progress("work", 1).mode == "log"


def test_bar_mode_draws_a_bar_on_stderr(monkeypatch, capsys):
    monkeypatch.setenv("SDZERO_PROGRESS", "bar")
    monkeypatch.setattr(progress_module, "BAR_DELAY", 0.0)
    with progress("drawn", 5, "things") as p:
        p.advance(5)
        p._bar.refresh()
    err = capsys.readouterr().err
    assert "drawn" in err and "5/5" in err and "things" in err


def _image(seed):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=64, mode="bilinear")


@pytest.mark.parametrize("batch_size", [4, 0])
def test_match_reports_points_times_restarts_times_steps_and_crops(sd, batch_size):
    cfg = FitConfig(
        image_size=64, steps=3, num_embeddings=2, inference_crops=4, lr=0.05, batch_size=batch_size
    )
    pc = PromptCorrespondence(sd, cfg)
    points = torch.tensor([[10.0, 12.0], [30.0, 40.0], [50.0, 20.0]])
    with observe() as ticks:
        pc.match(_image(0), _image(1), points, seed=0)
    # 3 points x 2 restarts = 6 items, each 3 optimisation steps + 4 inference crops
    assert _finals(ticks, "match") == [("match 3 points x 2 restarts", 42, 42)]
    notes = [t.note for t in ticks if t.note]
    # chunks of 4 items fit 2 points, then 1 more; one chunk fits all three
    assert sorted(set(notes)) == (
        ["2/3 points fitted", "3/3 points fitted"] if batch_size else ["3/3 points fitted"]
    )


def test_match_with_early_stopping_still_completes_its_report(sd):
    cfg = FitConfig(
        image_size=64, steps=6, num_embeddings=1, inference_crops=1, lr=0.05, early_stop_patience=1
    )
    pc = PromptCorrespondence(sd, cfg)
    with observe() as ticks:
        pc.match(_image(0), _image(1), torch.tensor([[10.0, 12.0], [30.0, 40.0]]), seed=0)
    assert int(pc.steps_taken.sum()) < 12  # some steps were saved...
    assert _finals(ticks, "match") == [("match 2 points x 1 restarts", 14, 14)]  # ...and counted


def test_support_sampling_reports_classes_times_images_times_steps(sd_text):
    with observe() as ticks:
        for name in ("cat", "dog"):
            sample_support_set(sd_text, name, num_support=3, steps=2, size=64, batch_size=2)
    assert _finals(ticks, "support") == [
        ("support images of 'cat' (3 x 2 steps)", 6, 6),
        ("support images of 'dog' (3 x 2 steps)", 6, 6),
    ]
    # batches of 2 then 1 image: each denoising step advances by its batch's images
    assert [t.done for t in ticks if t.desc.endswith("'cat' (3 x 2 steps)") and not t.note] == [
        2,
        4,
    ]
    assert [t.note for t in ticks if "'dog'" in t.desc][-1] == "3/3 images"


@pytest.fixture(scope="module")
def sd_text():
    from sdzero.backbones.sd import load_stable_diffusion

    return load_stable_diffusion(None, "tiny", text_encoder=True)


@pytest.fixture(scope="module")
def support(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic_voc(root, num_images=1, classes=2, image_size=64, num_support=3)
    return root / "support"


def test_prototypes_report_classes_and_support_features_and_segment_its_windows(support, tmp_path):
    colour, source, cache = ColourExtractor(), FolderSupport(support, 64), PrototypeCache(tmp_path)
    with observe() as ticks:
        built = build_prototypes(["ball", "box"], [colour], source, "saliency", cache, batch_size=2)
    assert _finals(ticks, "prototypes") == [("prototypes of 2 classes", 2, 2)]
    assert _finals(ticks, "features") == [  # 3 support images x 1 extractor per class
        ("features of 'ball' (3 support images x 1 extractors)", 3, 3),
        ("features of 'box' (3 support images x 1 extractors)", 3, 3),
    ]
    with observe() as ticks:  # from the cache: classes counted, no features computed
        build_prototypes(["ball", "box"], [colour], source, "saliency", cache, batch_size=2)
    assert _finals(ticks, "prototypes") == [("prototypes of 2 classes", 2, 2)]
    assert _finals(ticks, "features") == []

    bank = PrototypeBank.build({1: built["ball"]["colour"], 2: built["box"]["colour"]}, (), 0.85)
    segmenter = Segmenter(
        [colour], [bank], 3, 0, window_sizes=(48, 32), stride=16, short_side=64, window_batch=3
    )
    with observe() as ticks:
        segmenter(torch.zeros(3, 64, 64, dtype=torch.uint8))
    # 64 px, stride 16: 2 x 2 windows of 48, 3 x 3 of 32, and the full image
    assert _finals(ticks, "segment") == [("segment: 14 windows", 14, 14)]
