"""The configs of every correspondence datamodule (SPair-71k, PF-Willow, CUB-200-2011, synthetic);
each loader's tests are in test_spair_data.py, test_pfwillow_data.py, test_cub_data.py and
test_synthetic_correspondence_data.py."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "data"


@pytest.mark.parametrize("name", ["spair", "pfwillow", "cub", "synthetic_correspondence"])
def test_config_lists_every_argument_with_its_default(name):
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    module, _, attr = cfg._target_.rpartition(".")
    params = inspect.signature(getattr(importlib.import_module(module), attr)).parameters
    assert set(cfg) - {"_target_"} == set(params)
    for key, param in params.items():
        if OmegaConf.is_missing(cfg, key):
            assert param.default is inspect.Parameter.empty
        else:
            assert cfg[key] == param.default, key
