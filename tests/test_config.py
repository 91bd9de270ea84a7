"""Config composition, validation and instantiation over every YAML under configs/."""

import inspect

import pytest
import pytorch_lightning as pl
from omegaconf import OmegaConf

from sdzero.config import GROUPS, ConfigError, available, compose, config_dir, instantiate
from sdzero.runs import build_logger


def _required_overrides(tmp_path):
    return [f"data.root={tmp_path}", f"output_dir={tmp_path / 'run'}"]


def test_every_group_option_composes_and_instantiates(tmp_path):
    for group in GROUPS:
        options = available(group)
        assert options, f"configs/{group}/ is empty"
        for option in options:
            cfg = compose(None, [f"{group}={option}", *_required_overrides(tmp_path)])
            node = cfg[group]
            if "_target_" in node:
                if group == "data":
                    obj = instantiate(node, key=group)
                    assert isinstance(obj, pl.LightningDataModule)
                else:
                    obj = instantiate(
                        node, key=group, backbone=OmegaConf.to_container(cfg.backbone), run_dir=None
                    )
                    assert isinstance(obj, pl.LightningModule)
            elif group == "trainer":
                params = inspect.signature(pl.Trainer).parameters
                assert set(node) <= set(params), f"trainer/{option}.yaml has non-Trainer keys"
            elif group == "logger":
                logger = build_logger(cfg, tmp_path)
                assert (logger is False) == (option == "none")
            elif group == "backbone":
                assert node.arch in {"sd14", "sd15", "sd21-base", "tiny"}


def test_every_experiment_composes_and_instantiates(tmp_path):
    for name in available("experiment"):
        cfg = compose(name, _required_overrides(tmp_path))
        assert cfg.experiment == name
        method = instantiate(
            cfg.method, key="method", backbone=OmegaConf.to_container(cfg.backbone)
        )
        assert isinstance(method, pl.LightningModule)
        if name.startswith("demo_"):  # synthetic data: the datamodule works without a dataset
            assert isinstance(instantiate(cfg.data, key="data"), pl.LightningDataModule)


def test_every_yaml_file_is_reachable():
    files = {
        p.relative_to(config_dir()).with_suffix("").as_posix() for p in config_dir().rglob("*.yaml")
    }
    reachable = {"eval"} | {f"{g}/{o}" for g in (*GROUPS, "experiment") for o in available(g)}
    assert files == reachable


def test_dotlist_overrides_and_group_choice(tmp_path):
    cfg = compose(
        None, ["backbone=tiny", "seed=7", "trainer.devices=3", *_required_overrides(tmp_path)]
    )
    assert cfg.backbone.arch == "tiny" and cfg.backbone.weights is None
    assert cfg.seed == 7 and cfg.trainer.devices == 3
    assert cfg.choices.backbone == "tiny"


def test_unknown_key_names_the_closest_valid_one(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'trainer\.devises'.*trainer\.devices"
    ):
        compose(None, ["trainer.devises=2", *_required_overrides(tmp_path)])
    with pytest.raises(ConfigError, match=r"'sed'.*seed"):
        compose(None, ["sed=1", *_required_overrides(tmp_path)])


def test_unknown_group_option_lists_options(tmp_path):
    with pytest.raises(ConfigError, match=r"no config 'sd99' in group 'backbone'.*sd14"):
        compose(None, ["backbone=sd99", *_required_overrides(tmp_path)])


def test_unknown_experiment(tmp_path):
    with pytest.raises(ConfigError, match="unknown experiment 'nope'"):
        compose("nope", _required_overrides(tmp_path))


def test_missing_required_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required value\(s\): data\.root"):
        compose(
            None, ["data=" + next(d for d in available("data") if not d.startswith("synthetic"))]
        )


def test_experiment_file_path_and_its_defaults(tmp_path):
    exp = tmp_path / "mine.yaml"
    exp.write_text("defaults:\n  - backbone: tiny\nseed: 3\n")
    cfg = compose(str(exp), _required_overrides(tmp_path))
    assert cfg.experiment == "mine" and cfg.seed == 3 and cfg.backbone.arch == "tiny"
    bad = tmp_path / "bad.yaml"
    bad.write_text("sede: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sede'.*seed"):
        compose(str(bad), _required_overrides(tmp_path))


def test_instantiate_checks_the_signature():
    node = {"_target_": "logging.Formatter", "datefnt": "%H"}
    with pytest.raises(ConfigError, match=r"unknown config key x\.datefnt.*x\.datefmt"):
        instantiate(node, key="x")
    assert instantiate({"_target_": "logging.Formatter", "datefmt": "%H"}, key="x").datefmt == "%H"
    with pytest.raises(ConfigError, match="cannot be imported"):
        instantiate({"_target_": "nowhere.Thing"}, key="x")
