"""Start-up: `--help`, `--version`, config errors and `info` load no heavy library, and the
settings schema read from the sources equals the imported settings dataclasses'."""

import ast
import json
import subprocess
import sys
import textwrap
import typing

import pytest
from omegaconf import OmegaConf

from sdzero import config as config_module
from sdzero.config import _import, available, compose, config_dir
from sdzero.settings import settings_defaults
from sdzero.settings_source import Unresolved, _project, _tree, source_schema

HEAVY = (
    "torch",
    "torchvision",
    "torchmetrics",
    "pytorch_lightning",
    "lightning_fabric",
    "diffusers",
    "transformers",
    "open_clip",
    "timm",
    "matplotlib",
    "scipy",
    "sklearn",
    "wandb",
)

# Runs each command in this fresh interpreter and prints, per command, its exit code and the
# heavy modules loaded so far (a command's loads stay in sys.modules for the next ones).
PROBE = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from sdzero.cli import main
    heavy, report = {heavy!r}, []
    for argv in {commands!r}:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
        loaded = sorted(m for m in heavy if m in sys.modules)
        report.append([argv, code, loaded, out.getvalue()[-300:], err.getvalue()[-300:]])
    print(json.dumps(report))
    """
)


def _probe(commands: list[list[str]]) -> list[list]:
    script = PROBE.format(heavy=HEAVY, commands=commands)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.splitlines()[-1])


def test_help_version_and_config_errors_load_no_heavy_library(tmp_path):
    root = f"data.root={tmp_path}"
    commands = [
        ["--help"],
        ["--version"],
        ["eval", "--help"],
        ["eval", "demo_correspondence", "method.stepz=1"],
        ["config", "demo_correspondence", "method.steps=abc"],
        ["train", "demo_train", "method.channelz=3"],
        ["eval", "demo_segmentation", "method.extractors=sd"],  # a string for a list
        ["config", "spair_ldm"],  # data.root missing
        ["config", "geoaware_zs", root, "method.flip_alignn=true"],  # a protocol preset
        ["eval", "no_such_experiment"],
        ["config", "demo_correspondence", "data=no_such_data"],
        ["match", "a.png", "b.png", "--points", "1,2", "method.stepz=1"],
        ["segment", "a.png", "--classes", "cat", "method.kmeans_kk=1"],
        ["prototypes", "build", "--out", "p", "--classes", "cat", "method.kmeans_kk=1"],
    ]
    report = _probe(commands)
    assert [r[0] for r in report] == commands
    for argv, code, loaded, _, _ in report:
        assert loaded == [], f"{argv} loaded {loaded}"
        assert code == (0 if argv in (["--help"], ["--version"], ["eval", "--help"]) else 2), argv
    errors = {tuple(r[0]): r[4] for r in report}
    assert "Did you mean: method.steps" in errors[("eval", "demo_correspondence", "method.stepz=1")]
    assert (
        "method.steps must be an integer, got 'abc'"
        in errors[("config", "demo_correspondence", "method.steps=abc")]
    )
    assert (
        "method.extractors must be a list of a string"
        in errors[("eval", "demo_segmentation", "method.extractors=sd")]
    )
    assert "data.root" in errors[("config", "spair_ldm")]
    assert "method.flip_align" in errors[("config", "geoaware_zs", root, "method.flip_alignn=true")]
    assert "no_such_data" in errors[("config", "demo_correspondence", "data=no_such_data")]


def test_info_loads_torch_for_the_devices_and_nothing_heavier():
    ((argv, code, loaded, out, _),) = _probe([["info"]])
    assert code == 0 and "cuda devices" in out
    assert loaded == ["torch"]


def _targets() -> list[str]:
    groups = [p for p in config_dir().iterdir() if p.is_dir() and p.name != "experiment"]
    nodes = [OmegaConf.load(f) for g in groups for f in sorted(g.glob("*.yaml"))]
    return sorted({str(n._target_) for n in nodes if "_target_" in n})


@pytest.mark.parametrize("target", _targets())
def test_source_schema_equals_the_imported_settings_class(target):
    cls = getattr(_import(target), "settings_class", None)
    schema = source_schema(target)
    if cls is None:
        assert schema is None
        return
    assert schema.name == f"{cls.__module__}.{cls.__qualname__}"
    defaults = settings_defaults(cls)
    assert list(schema.defaults.items()) == list(defaults.items())  # values and key order
    hints = typing.get_type_hints(cls)
    assert schema.hints == {name: hints[name] for name in defaults}  # every field checkable


def test_every_experiment_composes_the_same_from_the_sources_as_from_the_imports(
    tmp_path, monkeypatch
):
    overrides = [f"data.root={tmp_path}"]
    static = {name: compose(name, overrides) for name in available("experiment")}

    def unresolved(target: str):
        raise Unresolved(target)

    monkeypatch.setattr(config_module, "source_schema", unresolved)
    for name, cfg in static.items():
        imported = compose(name, overrides)
        assert OmegaConf.to_yaml(cfg) == OmegaConf.to_yaml(imported), name


PACKAGE = {
    "__init__.py": "",
    "base.py": """
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Scoring:
            alpha: float = 0.1
            frame: str = "original"

        @dataclass(frozen=True)
        class Fit:
            steps: int = 10
            frame: str = "resized"
        """,
    "settings.py": """
        from dataclasses import dataclass
        from fakeproj.base import Fit, Scoring

        @dataclass(frozen=True)
        class Both(Fit, Scoring):
            steps: int = 3
            layers: tuple[int, ...] = (7, 8)
            weights: "Weights | None" = None
        """,
    "methods.py": """
        import collections as c
        from fakeproj import settings as s
        from fakeproj.settings import Both

        class Named:
            settings_class = Both

        class Method(Named, c.OrderedDict):
            pass

        class Plain(c.OrderedDict):
            pass

        class ViaModule:
            settings_class = s.Both
        """,
    "computed.py": """
        from dataclasses import dataclass

        @dataclass(frozen=True)
        class Computed:
            steps: int = 2 * 5

        class Method:
            settings_class = Computed

        class Conditional:
            if True:
                settings_class = Computed
        """,
}


@pytest.fixture
def fakeproj(tmp_path, monkeypatch):
    package = tmp_path / "fakeproj"
    package.mkdir()
    for name, text in PACKAGE.items():
        (package / name).write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr("sdzero.settings_source.PROJECT_PACKAGES", ("fakeproj",))
    yield package
    for name in [m for m in sys.modules if m.startswith("fakeproj")]:
        del sys.modules[name]


def test_source_schema_follows_bases_imports_and_dataclass_field_order(fakeproj):
    schema = source_schema("fakeproj.methods.Method")  # settings_class named by a base class
    assert schema.name == "fakeproj.settings.Both"
    # dataclass order: the bases' fields in reversed MRO (Scoring, then Fit), then its own;
    # a redefined field keeps its first place and takes the nearest default
    assert list(schema.defaults.items()) == [
        ("alpha", 0.1),
        ("frame", "resized"),
        ("steps", 3),
        ("layers", [7, 8]),
        ("weights", None),
    ]
    assert schema.hints == {"alpha": float, "frame": str, "steps": int, "layers": tuple[int, ...]}
    assert source_schema("fakeproj.methods.ViaModule").defaults == schema.defaults
    assert source_schema("fakeproj.methods.Plain") is None  # only outside bases: no settings
    from fakeproj.methods import Method

    assert settings_defaults(Method.settings_class) == schema.defaults


def test_source_schema_gives_up_on_what_it_cannot_read(fakeproj):
    with pytest.raises(Unresolved, match="computed default"):
        source_schema("fakeproj.computed.Method")
    with pytest.raises(Unresolved, match="not a plain class attribute"):
        source_schema("fakeproj.computed.Conditional")
    with pytest.raises(Unresolved):
        source_schema("fakeproj.methods.Missing")
    with pytest.raises(Unresolved):
        source_schema("collections.OrderedDict")  # not a project package


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Absolute module names a module imports when it is imported: its statements and the blocks
    in them, not function bodies nor ``if TYPE_CHECKING:`` blocks."""
    names, nodes = [], list(tree.body)
    while nodes:
        node = nodes.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
            isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        ):
            continue
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        nodes += [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.stmt)]
    return names


def _loaded_at_import(module: str) -> set[str]:
    """Every module (and package above it) that importing ``module`` loads, following the
    project's module-level imports through its sources (``from m import name``: ``m``, and
    ``m.name`` when that is a module)."""
    found, todo = set(), [module]
    while todo:
        parts = todo.pop().split(".")
        for name in (".".join(parts[: i + 1]) for i in range(len(parts))):
            if name in found:
                continue
            if not _project(name):
                found.add(name)
                continue
            try:
                tree = _tree(name)
            except (Unresolved, ModuleNotFoundError):  # ``from m import name`` of a non-module
                continue
            found.add(name)
            todo += _module_level_imports(tree)
    return found


def test_a_method_without_stable_diffusion_imports_no_diffusers():
    # the conv matcher of `sdzero train demo_train`: diffusers' import alone is ~3 s of start-up
    loaded = _loaded_at_import("sdzero.correspondence.conv_matcher")
    assert "sdzero.evaluation" in loaded and "torch" in loaded  # the walk follows sdzero's imports
    assert not {"diffusers", "transformers", "sdzero.backbones.sd"} & loaded
    assert "diffusers" in _loaded_at_import("sdzero.correspondence.module")  # ldm_corr needs it
