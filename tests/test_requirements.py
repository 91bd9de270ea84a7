"""Packages and weights are checked before anything loads: one line naming every key that needs
something missing and the setting that avoids it; an unreachable hub is probed once, then the
process works offline (no retry storms)."""

import socket

import numpy as np
import pytest
from PIL import Image

from sdzero.cli import main


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def unreachable_hub(monkeypatch):
    """``HF_HUB_OFFLINE`` unset and no network: connections fail; returns the probe count."""
    from huggingface_hub import constants

    from sdzero import requirements

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # restored after the test (go_offline sets it)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(requirements, "_PROBED", {})
    monkeypatch.setattr(requirements, "_OFFLINE_HERE", [])
    probes = []

    def refuse(address, timeout=None):
        probes.append((address, timeout))
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    return probes


def test_segment_with_its_defaults_offline_is_one_line_naming_the_keys(
    tmp_path, capsys, no_network_built, empty_cache, unreachable_hub
):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(image)
    assert main(["segment", str(image), "--classes", "cat"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    line = err[-1]
    assert line.startswith("sdzero: error: ") and "Nothing was loaded" in line
    assert "the Hugging Face hub cannot be reached" in line
    for key in ("backbone.weights", "method.extractors", "method.clip_filter"):
        assert f"{key}" in line
    assert "(or set method.clip_filter=false)" in line
    assert "(or set method.mask_proposer=attention)" in line  # detectron2 is not installed here
    # CLIP serves both the clip extractor and the filter: one entry naming both keys
    assert line.count("clip_vitb16 weights") == 1
    assert "method.extractors, method.clip_filter: clip_vitb16" in line
    assert len(unreachable_hub) == 1 and unreachable_hub[0][1] <= 5  # one short probe
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1"  # later loads read the cache, no retries


def test_cached_weights_pass_offline_and_missing_ones_name_the_repo(
    empty_cache, monkeypatch, unreachable_hub
):
    from sdzero.backbones.errors import WeightsNotFoundError
    from sdzero.requirements import check_requirements, sd_requirements

    need = sd_requirements({"weights": "org/model"})
    with pytest.raises(WeightsNotFoundError, match=r"hf download org/model"):
        check_requirements(need)
    snapshot = empty_cache / "models--org--model" / "snapshots" / "abc123"
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (empty_cache / "models--org--model" / "refs").mkdir()
    (empty_cache / "models--org--model" / "refs" / "main").write_text("abc123")
    check_requirements(need)  # cached: fine offline
    assert len(unreachable_hub) == 1  # the hub was probed once for both checks
    assert sd_requirements({"weights": None}) == []  # random weights need nothing


def test_a_reachable_hub_is_not_an_error(empty_cache, monkeypatch):
    from huggingface_hub import constants

    from sdzero import requirements

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(requirements, "_PROBED", {})

    class Open:
        def close(self):
            pass

    monkeypatch.setattr(socket, "create_connection", lambda address, timeout=None: Open())
    requirements.check_requirements(requirements.sd_requirements({"weights": "org/model"}))


def test_a_missing_package_names_the_key_that_avoids_it():
    from sdzero.errors import MissingDependencyError
    from sdzero.requirements import check_requirements, package_requirement

    need = package_requirement("no_such_package_xyz", "method.thing", "a thing", "method.x=off")
    with pytest.raises(MissingDependencyError) as err:
        check_requirements(need)
    assert str(err.value) == (
        "method.thing: a thing: the package 'no_such_package_xyz' is not installed "
        "(or set method.x=off). Nothing was loaded"
    )
    assert package_requirement("json", "k", "w") == []
