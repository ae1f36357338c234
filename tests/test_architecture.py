"""The layering of docs/ARCHITECTURE.md, checked on every module's imports.

Read with ``ast``, not by importing: a violation is found even in a module
no test imports, and the check needs none of the dependencies.
"""

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qconnect"

FEATURES = {"client", "service", "persist", "policy", "loopback", "expose"}
ENTRY_POINTS = {"qconnect.__main__", "qconnect.cli", "qconnect.demo"}

#: Feature -> the other features it may import, each with its reason (see the document).
ALLOWED_BETWEEN_FEATURES = {
    "loopback": {"policy"},  # plays dom0 with dom0's own evaluator
    "expose": {"policy", "persist", "client"},  # dom0's rule, via's binding, this qube's name
}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {_module_name(path, package): path for path in sorted(package.rglob("*.py"))}


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """Every absolute import of ``path``, as (line, module), ``from X import Y`` as X.Y too."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The qconnect module ``name`` is or lies in (``a.b.C`` -> ``a.b``), else None."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _layer(module: str) -> tuple[str, str]:
    """(layer, feature) of a qconnect module: entry, core or feature."""
    parts = module.split(".")
    if module == "qconnect":  # the package's root holds its version only
        return "core", ""
    if module in ENTRY_POINTS or module.startswith("qconnect.demo."):
        return "entry", ""
    if len(parts) > 2 and parts[1] in FEATURES and parts[2] == "cli":
        return "entry", parts[1]
    if len(parts) > 1 and parts[1] == "core":
        return "core", ""
    assert len(parts) > 1 and parts[1] in FEATURES, f"{module} is in no layer of the document"
    return "feature", parts[1]


def violations(package: Path = PACKAGE) -> list[str]:
    modules = _modules(package)
    found = []
    for module, path in modules.items():
        layer, feature = _layer(module)
        for line, name in _imports(path):
            target = _known(name, modules) if name.startswith("qconnect") else None
            if target is None or target == module:
                continue
            target_layer, target_feature = _layer(target)
            where = f"{path.relative_to(package.parent)}:{line}: imports {target}"
            if target_layer == "entry" and layer != "entry":
                found.append(f"{where}: an entry point")
            elif layer == "core" and target_layer != "core":
                found.append(f"{where}: the core imports only the core")
            elif (
                feature  # a feature's modules, its cli.py included
                and target_feature
                and target_feature != feature
                and target_feature not in ALLOWED_BETWEEN_FEATURES.get(feature, set())
            ):
                found.append(f"{where}: another feature, with no reason in the document")
    return sorted(set(found))


def test_every_module_imports_along_the_layers() -> None:
    assert violations() == []


def _reachable(start: set[str], modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the non-qconnect top-level modules it imports, over all it reaches."""
    seen: set[str] = set()
    outside: dict[str, set[str]] = {}
    todo = list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        for _line, name in _imports(modules[module]):
            target = _known(name, modules) if name.startswith("qconnect") else None
            if target is not None:
                todo.append(target)
                # importing a.b.c runs a/__init__ and a/b/__init__ first
                parent = target.rpartition(".")[0]
                while parent:
                    todo.append(parent)
                    parent = parent.rpartition(".")[0]
            elif not name.startswith("qconnect"):
                outside.setdefault(module, set()).add(name.partition(".")[0])
    return outside


@pytest.mark.parametrize(
    ("feature", "forbidden"),
    [
        ("policy", "anything outside the standard library"),
        ("persist", "trio"),
        ("core.install", "trio"),
    ],
)
def test_feature_stays_within_its_dependencies(feature: str, forbidden: str) -> None:
    modules = _modules()
    prefix = f"qconnect.{feature}"
    start = {m for m in modules if m == prefix or m.startswith(prefix + ".")}
    assert start, f"no module under {prefix}"
    bad = {}
    for module, names in _reachable(start, modules).items():
        if forbidden == "trio":
            wrong = {name for name in names if name == "trio"}
        else:
            # dom0's own Admin API client is the one non-stdlib import allowed, guarded there.
            wrong = names - set(sys.stdlib_module_names) - {"qubesadmin"}
        if wrong:
            bad[module] = sorted(wrong)
    assert bad == {}


@pytest.mark.parametrize(
    ("module", "planted", "reason"),
    [
        ("core/spec.py", "qconnect.client.server", "the core imports only the core"),
        ("persist/render.py", "qconnect.client.qrexec_call", "another feature"),
        ("service/daemon.py", "qconnect.cli", "an entry point"),
    ],
)
def test_the_check_sees_a_planted_violation(
    tmp_path: Path, module: str, planted: str, reason: str
) -> None:
    """Each rule can fail: an import planted against it in a copy of the package is reported."""
    import shutil

    copy = tmp_path / "qconnect"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / module, "a") as file:
        file.write(f"\nimport {planted}  # planted\n")
    found = violations(copy)
    assert len(found) == 1
    assert f"imports {planted}: {reason}" in found[0]
