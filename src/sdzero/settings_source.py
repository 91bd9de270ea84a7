"""A ``_target_``'s settings schema read from the source files, without importing the target.

Config composition needs every ``method.*`` key with its default and type before anything runs,
but a method's module imports torch, Lightning and diffusers (seconds). :func:`source_schema`
reads the same facts from the Python sources instead: the target class, the ``settings_class``
it (or a project base class) names, that dataclass's fields in dataclass order (bases first),
their literal defaults and their annotations. Only classes of the project's own packages
(:data:`PROJECT_PACKAGES`) are read; a base class from elsewhere (``pl.LightningModule``) is
taken to define no ``settings_class`` and no fields. Whenever the sources say something this
reader does not follow (a computed default, ``field(...)``, a re-exported alias, an external
dataclass base), it raises :class:`Unresolved` and the caller imports the target instead: the
answer is the imported class's or nothing. ``tests/test_startup.py`` checks that both agree for
every configured target.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_PACKAGES = ("sdzero", "datamodules")
# The names an annotation may use to be type-checked here (others are checked after the import).
_HINT_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "tuple": tuple, "Any": Any}


class Unresolved(Exception):
    """The sources say something :func:`source_schema` does not follow."""


@dataclass(frozen=True)
class SourceSchema:
    """The settings dataclass ``name`` (``module.Class``) of a target: ``defaults`` maps every
    init field, in dataclass order, to its default (tuples as lists, as YAML holds them);
    ``hints`` maps the fields whose annotations use only builtin types to those types."""

    name: str
    defaults: dict[str, Any]
    hints: dict[str, Any]


@dataclass(frozen=True)
class _Class:
    module: str
    node: ast.ClassDef


def _project(module: str) -> bool:
    return module.partition(".")[0] in PROJECT_PACKAGES


@functools.cache
def _tree(module: str) -> ast.Module:
    # find_spec imports the parent packages only; the project's __init__ files are light
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise Unresolved(f"no Python source for module {module!r}")
    return ast.parse(Path(spec.origin).read_text(encoding="utf-8"), spec.origin)


def _resolve(module: str, expr: ast.expr) -> _Class | None:
    """The project class ``expr`` names in ``module``; None for a class outside the project."""
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        for node in _tree(module).body:  # `import a.b as m` or `from a import b as m`; `m.Name`
            if isinstance(node, ast.ImportFrom) and node.level:
                continue  # the project imports absolutely; a relative one is not followed
            if isinstance(node, ast.Import | ast.ImportFrom):
                prefix = f"{node.module}." if isinstance(node, ast.ImportFrom) else ""
                for alias in node.names:
                    if (alias.asname or alias.name) == expr.value.id:
                        source = prefix + alias.name
                        return _lookup(source, expr.attr) if _project(source) else None
        raise Unresolved(f"{module}: cannot follow {ast.unparse(expr)}")
    if not isinstance(expr, ast.Name):
        raise Unresolved(f"{module}: cannot follow {ast.unparse(expr)}")
    return _lookup(module, expr.id)


def _lookup(module: str, name: str) -> _Class | None:
    """The project class bound to ``name`` at the top level of ``module``."""
    for node in _tree(module).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return _Class(module, node)
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    if node.level:  # the project imports absolutely
                        raise Unresolved(f"{module}: relative import of {name!r}")
                    source = str(node.module)
                    return _lookup(source, alias.name) if _project(source) else None
    raise Unresolved(f"{module}: {name!r} is not a class defined or imported there")


def _mro(cls: _Class) -> list[_Class | None]:
    """C3 linearisation of the project classes; None stands for any base outside the project."""
    bases = [_resolve(cls.module, b) for b in cls.node.bases]
    chains = [_mro(b) if b is not None else [None] for b in bases]
    chains.append(list(bases))
    order: list[_Class | None] = [cls]
    while any(chains):
        for chain in chains:
            head = chain[0] if chain else None
            if chain and not any(head in c[1:] for c in chains):
                break
        else:
            raise Unresolved(f"{cls.module}.{cls.node.name}: no consistent base order")
        order.append(head)
        chains = [c[1:] if c and c[0] == head else c for c in chains]
    return order


def _settings_expr(cls: _Class) -> ast.expr | None:
    for node in cls.node.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "settings_class" for t in node.targets
        ):
            return node.value
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "settings_class"
        ):
            return node.value
    if any(isinstance(n, ast.Name) and n.id == "settings_class" for n in ast.walk(cls.node)):
        raise Unresolved(f"{cls.node.name}: settings_class is not a plain class attribute")
    return None


def _is_dataclass(node: ast.ClassDef) -> bool:
    for deco in node.decorator_list:
        func = deco.func if isinstance(deco, ast.Call) else deco
        if isinstance(func, ast.Name | ast.Attribute) and ast.unparse(func).endswith("dataclass"):
            return True
    return False


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def _fields(cls: _Class) -> tuple[dict[str, Any], dict[str, Any]]:
    """Defaults and evaluable hints of a settings dataclass, in dataclass field order."""
    defaults: dict[str, Any] = {}
    hints: dict[str, Any] = {}
    for klass in reversed(_mro(cls)):
        if klass is None:
            raise Unresolved(f"{cls.node.name} has a base class outside the project")
        if not _is_dataclass(klass.node):
            continue
        for node in klass.node.body:
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            annotation = ast.unparse(node.annotation)
            if "ClassVar" in annotation or "InitVar" in annotation:
                raise Unresolved(f"{klass.node.name}.{node.target.id}: {annotation}")
            if node.value is None:
                raise Unresolved(f"{klass.node.name}.{node.target.id} has no default")
            try:
                default = ast.literal_eval(node.value)
            except (ValueError, TypeError):
                raise Unresolved(f"{klass.node.name}.{node.target.id}: computed default") from None
            name = node.target.id
            defaults[name] = _plain(default)
            hints.pop(name, None)
            with contextlib.suppress(NameError, AttributeError, TypeError):  # else checked later
                hint = eval(annotation, {"__builtins__": {}, "None": None}, _HINT_NAMES)
                if not isinstance(hint, str):  # a quoted annotation is checked later too
                    hints[name] = hint
    return defaults, hints


def source_schema(target: str) -> SourceSchema | None:
    """The settings schema of the class ``target`` (``package.module.Class``), or None when it
    names no ``settings_class``; :class:`Unresolved` when the sources cannot tell."""
    module, _, name = target.rpartition(".")
    if not module or not _project(module):
        raise Unresolved(f"{target!r} is not a class of the project's packages")
    cls = _lookup(module, name)
    if cls is None:
        raise Unresolved(f"{target!r} is re-exported from outside the project")
    for klass in _mro(cls):
        expr = None if klass is None else _settings_expr(klass)
        if expr is None:
            continue
        if isinstance(expr, ast.Constant) and expr.value is None:
            return None
        settings = _resolve(klass.module, expr)
        if settings is None:
            raise Unresolved(f"{target}: its settings class lies outside the project")
        defaults, hints = _fields(settings)
        return SourceSchema(f"{settings.module}.{settings.node.name}", defaults, hints)
    return None
