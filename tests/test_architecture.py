"""The layout's promises, checked on the source: the pure core imports no I/O
library, production code never imports the embedded stack, only the adapters
touch another package's private attributes, and every package ships."""

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "pipeline"
IO_LIBRARIES = {"faust", "mode", "aiohttp", "aiokafka", "clickhouse_connect", "chdb"}
# namedtuple's API starts with an underscore and is public
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def modules(under: Path = PACKAGE):
    for path in sorted(under.rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text(), str(path))


def imported(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def top_level(tree: ast.Module) -> set[str]:
    """What a module imports when it is imported (not inside functions)."""
    return imported(
        ast.Module(
            body=[n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)],
            type_ignores=[],
        )
    )


@pytest.mark.parametrize("name,path,tree", list(modules(PACKAGE / "core")), ids=lambda v: str(v))
def test_the_core_is_pure(name, path, tree):
    for module in imported(tree):
        root = module.split(".")[0]
        assert root not in IO_LIBRARIES, f"{name} imports {module}"
        if root == "pipeline":
            assert module.startswith(("pipeline.core", "pipeline.config")), f"{name}: {module}"


def test_production_never_imports_the_embedded_stack():
    for name, _, tree in modules():
        if name.startswith("pipeline.dev"):
            continue
        found = {m for m in top_level(tree) if m.startswith("pipeline.dev")}
        assert not found, f"{name} imports {found}"
        if name != "pipeline.cli":  # which runs `pipeline dev` on request
            assert not {m for m in imported(tree) if m.startswith("pipeline.dev")}, name


def private_reads(tree: ast.AST) -> list[str]:
    """`x._name` where `x` is not self or cls: another object's private attribute."""
    found = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.attr not in PUBLIC_UNDERSCORED
            and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
        ):
            found.append(f"line {node.lineno}: .{node.attr}")
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("getattr", "setattr"):
            arg = node.args[1] if len(node.args) > 1 else None
            if isinstance(arg, ast.Constant) and str(arg.value).startswith("_"):
                found.append(f"line {node.lineno}: getattr {arg.value}")
    return found


def test_only_the_adapters_touch_private_attributes():
    offenders = {}
    for name, _, tree in modules():
        if name.startswith(("pipeline.adapters", "pipeline.dev")):
            continue
        if found := private_reads(tree):
            offenders[name] = found
    assert not offenders


def test_every_package_is_in_the_wheel():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")} | {
        "pipeline.schemas"
    }
    assert listed == on_disk
