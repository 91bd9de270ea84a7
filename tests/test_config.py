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
                        node, key=group, backbone=OmegaConf.to_container(cfg.backbone)
                    )
                    assert isinstance(obj, pl.LightningModule)
            elif group == "trainer":
                params = inspect.signature(pl.Trainer).parameters
                assert set(node) <= set(params), f"trainer/{option}.yaml has non-Trainer keys"
            elif group == "logger":
                logger = build_logger(cfg, tmp_path)
                assert (logger is False) == (option == "none")
            elif group == "backbone":
                assert node.arch in {"sd14", "sd15", "sd21-base", "sd21", "tiny"}


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
    groups = (*GROUPS, "experiment", "suite")  # suites: `sdzero suite NAME`
    reachable = {"eval"} | {f"{g}/{o}" for g in groups for o in available(g)}
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


# ------------------------------------------------------------ settings dataclasses are the schema


def _method_files() -> dict[str, tuple[dict, list[str]]]:
    """option -> (its own keys, without defaults/_target_; the options it inherits)."""
    files = {}
    for option in available("method"):
        raw = OmegaConf.load(config_dir() / "method" / f"{option}.yaml")
        parents = [str(p) for p in raw.pop("defaults", [])]
        raw.pop("_target_", None)
        files[option] = (OmegaConf.to_container(raw), parents)
    return files


def test_method_yaml_holds_only_what_differs_from_the_code(tmp_path):
    from sdzero.config import settings_class
    from sdzero.settings import settings_defaults

    files = _method_files()
    for option, (own, parents) in files.items():
        cfg = compose(None, [f"method={option}", *_required_overrides(tmp_path)])
        cls = settings_class(cfg.method)
        if cls is None:
            continue
        composed = OmegaConf.to_container(cfg.method)
        composed.pop("_target_")
        defaults = settings_defaults(cls)
        assert set(composed) == set(defaults), option  # every key comes from the dataclass
        inherited = dict(defaults)
        for parent in parents:
            inherited |= files[parent][0]
        for key, value in own.items():  # a written value is a real difference, written once
            assert value != inherited[key], f"method/{option}.yaml restates {key}={value}"
        differs = {k: v for k, v in composed.items() if v != defaults[k]}
        assert differs == {k: v for k, v in {**inherited, **own}.items() if v != defaults[k]}


def test_ldm_corr_clean_inherits_ldm_corr_and_changes_four_keys(tmp_path):
    base = compose(None, _required_overrides(tmp_path)).method
    clean = compose(None, ["method=ldm_corr_clean", *_required_overrides(tmp_path)]).method
    changed = {k for k in base if base[k] != clean[k]}
    assert changed == {"heads", "infer_timestep", "noise", "gaussian_grid"}
    assert clean.lr == 0.0023755632081200314 and clean.gaussian_grid == "center"


def test_bad_method_settings_fail_at_compose_naming_the_key(tmp_path):
    req = _required_overrides(tmp_path)
    for item, pattern in (
        ("method.noise=foo", r"method\.noise must be 'uniform' or 'gaussian'"),
        ("method.steps=abc", r"method\.steps must be an integer, got 'abc'"),
        ("method.heads=4", r"method\.heads must be a list of an integer or null, got 4"),
        ("method.lr=[1,2]", r"method\.lr must be a number"),
        ("method.gaussian_grid=edge", r"method\.gaussian_grid must be one of"),
    ):
        with pytest.raises(ConfigError, match=pattern):
            compose(None, [item, *req])
    assert compose(None, ["method.lr=1", *req]).method.lr == 1  # an int is a number


def test_group_options_inherit_and_cycles_are_refused(tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "configs"
    shutil.copytree(config_dir(), root)
    monkeypatch.setenv("SDZERO_CONFIG_DIR", str(root))
    (root / "method" / "mine.yaml").write_text("defaults: [ldm_corr_clean]\nsteps: 7\n")
    cfg = compose(None, ["method=mine", *_required_overrides(tmp_path)])
    assert cfg.method.steps == 7 and cfg.method.noise == "gaussian" and cfg.method.heads is None
    (root / "method" / "typo.yaml").write_text("defaults: [ldm_corr]\nstesp: 7\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml: unknown key 'stesp'.*steps"):
        compose(None, ["method=typo", *_required_overrides(tmp_path)])
    (root / "method" / "a.yaml").write_text("defaults: [b]\n")
    (root / "method" / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="cycle"):
        compose(None, ["method=a", *_required_overrides(tmp_path)])
