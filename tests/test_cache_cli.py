"""``sdzero cache list|clear`` on tiny caches written by the real writers, beside foreign files."""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import sdzero.segmentation.support as support_module
from datamodules.synthetic_segmentation import write_synthetic_voc
from sdzero.backbones.feature_cache import FeatureCache
from sdzero.cache_cli import human_age, human_size
from sdzero.cli import main
from sdzero.segmentation.features import ColourExtractor, build_extractor
from sdzero.segmentation.prototypes import PrototypeCache, build_prototypes
from sdzero.segmentation.support import FolderSupport, GeneratedSupport, SupportSet

FOREIGN = ("notes.txt", "ball.colour.pt", "support/mine/000.png", "support/ball-0123/x.png")


def _sample(sd, name, **settings):
    """Stand-in for SD sampling: two black 8x8 images, so the test needs no model."""
    return SupportSet(name, torch.zeros(2, 3, 8, 8), torch.zeros(2, 8, 8), [])


@pytest.fixture
def prototype_root(tmp_path: Path, monkeypatch) -> Path:
    """A prototype cache with one real-weight entry (colour: no model), one random-weight entry
    (a random tiny DINO), one support set sampled 'with' random SD weights, and foreign files."""
    write_synthetic_voc(tmp_path / "data", num_images=1, classes=1, image_size=32, num_support=2)
    root = tmp_path / "cache"
    extractors = [ColourExtractor(), build_extractor("dino:tiny_vit8", vit_weights="random")]
    folder = FolderSupport(tmp_path / "data" / "support", 32)
    build_prototypes(["ball"], extractors, folder, "saliency", PrototypeCache(root), kmeans_k=2)
    monkeypatch.setattr(support_module, "sample_support_set", _sample)
    random_sd = SimpleNamespace(source="random:tiny:seed=0", arch="tiny", dtype=torch.float32)
    GeneratedSupport(random_sd, root / "support", num_support=2)("ball")
    for name in FOREIGN:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("not sdzero's")
    (next((root / "support").glob("ball-*")) / "readme.txt").write_text("mine")
    return root


def _lines(capsys) -> list[str]:
    return capsys.readouterr().out.splitlines()


def test_list_marks_random_weight_entries_with_size_and_age(prototype_root, capsys):
    colour = next(prototype_root.glob("ball.colour.*.pt"))
    old = time.time() - 2 * 3600 - 5
    os.utime(colour, (old, old))
    assert main(["cache", "list", str(prototype_root)]) == 0
    lines = _lines(capsys)
    entries = [ln for ln in lines if "(" in ln and "entries" not in ln]
    assert len(entries) == 3  # foreign files are not listed
    colour_line = next(ln for ln in entries if colour.name in ln)
    assert f"{human_size(colour.stat().st_size)}" in colour_line and " 2 h " in colour_line
    assert " no " in colour_line and "extractor colour" in colour_line
    dino_line = next(ln for ln in entries if "dino_tiny_vit8" in ln)
    assert "RANDOM" in dino_line
    support_line = next(ln for ln in entries if "support set of 'ball', 2 images" in ln)
    assert "RANDOM" in support_line
    total = sum(p.stat().st_size for p in prototype_root.glob("ball.*.*.pt"))
    support = next((prototype_root / "support").glob("ball-*"))
    total += sum(p.stat().st_size for p in support.iterdir() if p.name != "readme.txt")
    assert lines[-1].strip() == f"3 entries, {human_size(total)}"


def test_clear_random_only_keeps_real_entries_and_foreign_files(prototype_root, capsys):
    assert main(["cache", "clear", "--random-only", str(prototype_root)]) == 0
    assert "deleted 2 random-weight prototypes entries" in _lines(capsys)[-1]
    assert [p.name for p in prototype_root.glob("ball.*.*.pt")][0].startswith("ball.colour.")
    assert len(list(prototype_root.glob("ball.*.*.pt"))) == 1
    support = next((prototype_root / "support").glob("ball-*"))
    assert [p.name for p in support.iterdir()] == ["readme.txt"]  # its own file stays
    assert all((prototype_root / name).is_file() for name in FOREIGN)


def test_clear_deletes_every_entry_and_nothing_else(prototype_root, capsys):
    assert main(["cache", "clear", str(prototype_root)]) == 0
    assert "deleted 3 prototypes entries" in _lines(capsys)[-1]
    assert not list(prototype_root.glob("ball.*.*.pt"))
    assert all((prototype_root / name).is_file() for name in FOREIGN)
    assert main(["cache", "list", str(prototype_root)]) == 0
    assert _lines(capsys)[-1].strip() == "0 entries, 0 B"


def test_default_root_is_the_prototype_cache_of_sdzero_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SDZERO_CACHE", str(tmp_path))
    assert main(["cache", "list"]) == 0
    lines = _lines(capsys)
    assert lines[0] == f"prototypes cache {tmp_path / 'prototypes'}"
    assert lines[-1].strip() == "0 entries, 0 B"


def test_feature_cache_list_and_clear(tmp_path, capsys):
    cache = FeatureCache(tmp_path, max_bytes=1 << 30)
    cache.put("image a", torch.ones(4, 2, 2))
    cache.put("image b", torch.zeros(8, 2, 2))
    (tmp_path / "foreign.pt").write_text("x")
    assert main(["cache", "list", "--kind", "features", str(tmp_path)]) == 0
    lines = _lines(capsys)
    assert "unknowable" in lines[1] and lines[-1].strip().startswith("2 entries")
    assert sum("unknowable" in ln and "per-image features" in ln for ln in lines) == 2
    assert main(["cache", "clear", "--kind", "features", "--random-only", str(tmp_path)]) == 2
    assert cache.get("image a") is not None  # refused: nothing deleted
    assert main(["cache", "clear", "--kind", "features", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["foreign.pt"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["cache", "list", "--kind", "features"], "feature caches have no default folder"),
        (["cache", "clear", "{missing}"], "no such folder"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv, fragment):
    argv = [a.format(missing=tmp_path / "missing") for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]


def test_human_units():
    assert [human_size(n) for n in (0, 1023, 1536, 3 * 2**20, 5 * 2**30)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "3.0 MiB",
        "5.0 GiB",
    ]
    assert [human_age(s) for s in (59, 61, 7201, 90000)] == ["59 s", "1 min", "2 h", "1 d"]
