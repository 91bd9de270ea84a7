"""Config composition, validation and instantiation (plain OmegaConf, no Hydra).

``configs/eval.yaml`` holds a ``defaults`` list choosing one file per group (``backbone``, ``method``,
``data``, ``trainer``, ``logger``) plus the top-level keys. An experiment file (``configs/experiment/
NAME.yaml`` or any YAML path) may re-choose groups in its own ``defaults`` list and override keys;
command-line ``key=value`` items come last: ``backbone=tiny`` re-chooses a group, ``method.lr=0.01``
sets a key. The composed config is the schema: a key that does not exist in it is an error naming the
closest valid keys, and a required value left as ``???`` is an error naming the key.

``protocol=<name>`` (top level; :mod:`sdzero.tasks.protocols`) applies a correspondence scoring
preset's ``method.pck_*`` values after the experiment and before the command line's other items,
so an explicit ``method.pck_*=...`` still wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sdzero.errors import ConfigError  # defined there so that every layer can raise it
from sdzero.settings_source import SourceSchema, Unresolved, source_schema

GROUPS = ("backbone", "method", "data", "trainer", "logger")


def config_dir() -> Path:
    """The ``configs/`` folder: ``$SDZERO_CONFIG_DIR``, else the one beside the installed sources."""
    env = os.environ.get("SDZERO_CONFIG_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "configs" / "eval.yaml").is_file():
            return parent / "configs"
    raise ConfigError(
        "cannot find the configs/ folder (looked above "
        f"{here.parent}); install sdzero from its repository (pip install -e .) or set SDZERO_CONFIG_DIR"
    )


def available(group: str) -> list[str]:
    """Option names of a config group (``experiment`` included)."""
    return sorted(p.stem for p in (config_dir() / group).glob("*.yaml"))


def _load_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return cfg


def _did_you_mean(word: str, valid: Sequence[str], prefix: str = "") -> str:
    """`` Did you mean: a, b?`` for the closest valid names, or an empty string."""
    close = difflib.get_close_matches(word, list(valid), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""


def _group_file(group: str, option: str) -> Path:
    path = config_dir() / group / f"{option}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"no config {option!r} in group {group!r} (options: "
            f"{', '.join(available(group))}).{_did_you_mean(option, available(group))}"
        )
    return path


def _load_option(group: str, option: str, chain: tuple[str, ...] = ()) -> DictConfig:
    """A group option file, merged over the options its own ``defaults`` list names (inheritance:
    ``defaults: [ldm_corr]`` in ``method/ldm_corr_clean.yaml``), then over its target's settings
    schema (see :func:`_with_schema`)."""
    if option in chain:
        raise ConfigError(f"configs/{group}: options inherit in a cycle: {' -> '.join(chain)}")
    path = _group_file(group, option)
    cfg = _load_yaml(path)
    parents = cfg.pop("defaults", [])
    if not isinstance(parents, ListConfig | list):
        raise ConfigError(f"{path}: 'defaults' must be a list of {group} options to inherit")
    bases = [_load_option(group, str(p), (*chain, option)) for p in parents]
    merged = OmegaConf.merge(*bases, cfg) if bases else cfg
    return _with_schema(merged, str(path)) if not chain else merged


def settings_class(node: DictConfig | dict) -> type | None:
    """The settings dataclass of a node's ``_target_`` (its ``settings_class``), if it has one."""
    target = node.get("_target_")
    return getattr(_import(str(target)), "settings_class", None) if target else None


def _schema(node: DictConfig | dict) -> SourceSchema | None:
    """The settings schema of a node's ``_target_``, read from the sources (nothing imported;
    config errors come before torch loads), else from the imported settings dataclass."""
    target = node.get("_target_")
    if not target:
        return None
    try:
        return source_schema(str(target))
    except Unresolved:
        cls = settings_class(node)
        if cls is None:
            return None
        from sdzero.settings import settings_defaults

        return SourceSchema(cls.__qualname__, settings_defaults(cls), typing.get_type_hints(cls))


def _with_schema(node: DictConfig, source: str) -> DictConfig:
    """``node`` over the defaults of its target's settings dataclass, so the composed config holds
    every key (the YAML holds only what differs); a key that is not a setting is an error."""
    schema = _schema(node)
    if schema is None:
        return node
    defaults = schema.defaults
    for key in node:
        if key != "_target_" and key not in defaults:
            raise ConfigError(
                f"{source}: unknown key {key!r} for {node._target_}."
                f"{_did_you_mean(str(key), list(defaults))}"
            )
    return OmegaConf.merge({"_target_": node._target_, **defaults}, node)


def _split_defaults(cfg: DictConfig, source: str) -> dict[str, str]:
    """Pop and parse a ``defaults`` list of ``{group: option}`` items."""
    choices: dict[str, str] = {}
    if "defaults" not in cfg:
        return choices
    defaults = cfg.pop("defaults")
    if not isinstance(defaults, ListConfig):
        raise ConfigError(f"{source}: 'defaults' must be a list of 'group: option' items")
    for item in defaults:
        if not isinstance(item, DictConfig) or len(item) != 1:
            raise ConfigError(
                f"{source}: each defaults item must be one 'group: option' pair, got {item}"
            )
        ((group, option),) = item.items()
        group = str(group).removeprefix("override ").strip().lstrip("/")
        if group not in GROUPS:
            raise ConfigError(
                f"{source}: unknown config group {group!r} (groups: {', '.join(GROUPS)})"
            )
        choices[group] = str(option)
    return choices


def leaf_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every key in ``cfg`` (mappings are walked, lists are leaves)."""
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg:
            path = f"{prefix}{k}"
            keys.append(path)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                keys += leaf_keys(node, f"{path}.")
    return keys


def _check_known(cfg: DictConfig, keys: Sequence[str], source: str) -> None:
    valid = leaf_keys(cfg)
    for key in keys:
        if key in valid:
            continue
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        if parent and parent in valid and OmegaConf.select(cfg, parent) is None:
            continue  # setting a field inside a node that is null by default (e.g. a dict option)
        raise ConfigError(f"unknown config key {key!r} (from {source}).{_did_you_mean(key, valid)}")


def _dotlist_keys(items: Sequence[str]) -> list[str]:
    keys = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        keys.append(item.split("=", 1)[0].strip().lstrip("+"))
    return keys


def compose(experiment: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``eval.yaml`` + group files + experiment + command-line overrides; validate.

    :param experiment: a name under ``configs/experiment/`` or a path to a YAML file.
    :param overrides: ``key=value`` items; ``group=option`` re-chooses a config group.
    """
    base = _load_yaml(config_dir() / "eval.yaml")
    choices = _split_defaults(base, "eval.yaml")
    exp_cfg = OmegaConf.create()
    if experiment:
        path = Path(experiment)
        if not (path.suffix in {".yaml", ".yml"} and path.is_file()):
            names = available("experiment")
            if experiment not in names:
                raise ConfigError(
                    f"unknown experiment {experiment!r}: not a YAML file and not one of "
                    f"{', '.join(names)}.{_did_you_mean(experiment, names)}"
                )
            path = config_dir() / "experiment" / f"{experiment}.yaml"
        exp_cfg = _load_yaml(path)
        choices.update(_split_defaults(exp_cfg, str(path)))

    dotlist = []
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in GROUPS and "=" in item:
            choices[key] = item.split("=", 1)[1].strip()
        else:
            dotlist.append(item)

    cfg = base
    for group in GROUPS:
        if group not in choices:
            raise ConfigError(f"eval.yaml's defaults list has no entry for group {group!r}")
        cfg[group] = _load_option(group, choices[group])
    cfg.choices = dict(choices)
    if experiment:
        cfg.experiment = (
            Path(experiment).stem if experiment.endswith((".yaml", ".yml")) else experiment
        )
    _check_known(cfg, leaf_keys(exp_cfg), f"experiment {experiment!r}")
    cfg = OmegaConf.merge(cfg, exp_cfg)
    _check_known(cfg, _dotlist_keys(dotlist), "the command line")
    cfg = _apply_protocol(cfg, dotlist)
    for item in dotlist:  # one at a time, so that a value of the wrong shape names its key
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item.lstrip("+")]))
        except (TypeError, ValueError, OmegaConfBaseException) as err:
            key, value = item.lstrip("+").split("=", 1)
            raise ConfigError(
                f"{key}={value}: this value cannot replace the key's current value "
                f"({OmegaConf.select(cfg, key)!r}): {str(err).splitlines()[0]}"
            ) from err
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"missing required value(s): {', '.join(missing)}. Set them on the command line, "
            f"e.g. {missing[0]}=..."
        )
    OmegaConf.resolve(cfg)
    OmegaConf.set_struct(cfg, True)
    _check_top_level(cfg)
    for group in GROUPS:  # value types first, from the sources: no method module loads for these
        schema = _schema(cfg[group])
        if schema is not None:
            from sdzero.settings import coerce_values

            values = OmegaConf.to_container(cfg[group], resolve=True)
            values.pop("_target_")
            coerce_values(list(schema.defaults), schema.hints, values, key=group)
    for group in GROUPS:  # settings are checked now, before any dataset file is read
        cls = settings_class(cfg[group])
        if cls is not None:
            from sdzero.settings import build_settings

            values = OmegaConf.to_container(cfg[group], resolve=True)
            values.pop("_target_")
            build_settings(cls, values, key=group)
    return cfg


TOP_LEVEL_TYPES: dict[str, Any] = {
    "experiment": str | None,
    "output_dir": str | None,
    "resume": str | None,
    "seed": int,
    "protocol": str | None,
    "visuals": int,
}
"""The value type of each top-level key of ``eval.yaml`` (checked when the config is composed)."""


def _check_top_level(cfg: DictConfig) -> None:
    """A top-level key of the wrong type is a one-line error naming it (``seed=abc``)."""
    from sdzero.settings import coerce_values

    values = {k: cfg[k] for k in TOP_LEVEL_TYPES if k in cfg}
    coerce_values(list(values), TOP_LEVEL_TYPES, values, key="")
    if cfg.get("visuals", 0) < 0:
        raise ConfigError(f"visuals must be an integer >= 0, got {cfg.visuals}")


def _apply_protocol(cfg: DictConfig, dotlist: Sequence[str]) -> DictConfig:
    """``cfg`` with the ``method.pck_*`` values of the protocol that the command line (its last
    ``protocol=`` item) or else the experiment names; unchanged for ``null``."""
    items = [i for i in dotlist if i.split("=", 1)[0].strip().lstrip("+") == "protocol"]
    name = OmegaConf.from_dotlist([items[-1].lstrip("+")]).protocol if items else cfg.protocol
    if name is None:
        return cfg
    from sdzero.tasks.protocols import get_protocol

    values = get_protocol(str(name)).method_values(cfg.choices.data)
    missing = [key for key in values if key not in cfg.method]
    if missing:
        raise ConfigError(
            f"protocol={name}: method {cfg.choices.method!r} has no PCK scoring keys "
            f"({', '.join('method.' + k for k in missing)}); protocols apply to correspondence "
            "methods only"
        )
    return OmegaConf.merge(cfg, {"protocol": str(name), "method": values})


def _import(target: str) -> Any:
    module, _, attr = target.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"_target_ {target!r} cannot be imported: {err}") from err


def instantiate(node: DictConfig | dict, key: str = "", **extra: Any) -> Any:
    """Build ``node["_target_"](**other keys, **extra)``, checking keys against the signature first.

    :param key: the node's path in the config, used in error messages (e.g. ``"method"``).
    """
    params = (
        OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    )
    target = params.pop("_target_", None)
    if not target:
        raise ConfigError(f"config node {key or '<root>'!r} has no _target_")
    factory = _import(target)
    params.update(extra)
    sig = inspect.signature(factory)
    schema = getattr(factory, "settings_class", None)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if schema is not None or not accepts_any:
        names = [
            n for n, p in sig.parameters.items() if n != "self" and p.kind is not p.VAR_KEYWORD
        ]
        names += [f.name for f in dataclasses.fields(schema)] if schema is not None else []
        for name in params:
            if name not in names:
                raise ConfigError(
                    f"unknown config key {key}.{name} for {target}; valid keys: "
                    f"{', '.join(n for n in names if n not in extra)}."
                    f"{_did_you_mean(name, names, f'{key}.')}"
                )
    try:
        sig.bind(**params)
    except TypeError as err:
        raise ConfigError(f"config node {key!r} ({target}): {err}") from err
    _check_types(factory, {k: v for k, v in params.items() if k not in extra}, key)
    return factory(**params)


def _check_types(factory: Any, params: dict[str, Any], key: str) -> None:
    """Config values of the wrong type for the factory's annotated parameters are a ``key.name``
    error (``data.limit=abc``) before the factory runs; the values are passed on unchanged."""
    from sdzero.settings import coerce_values

    init = factory.__init__ if inspect.isclass(factory) else factory
    try:
        hints = typing.get_type_hints(init)
    except Exception:  # annotations that do not evaluate: nothing to check against
        return
    hints.pop("return", None)
    coerce_values(list(params), hints, params, key=key)


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from sdzero.records import write_bytes_atomic

    write_bytes_atomic(path, OmegaConf.to_yaml(cfg, resolve=True).encode())
