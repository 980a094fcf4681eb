"""The layering is checked, not hoped for: no import circles anywhere in featx, a curated API."""

from __future__ import annotations

import importlib

import grimp
import pytest


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph.modules):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles_between_any_featx_modules():
    graph = grimp.build_graph("featx")
    # a package __init__ that re-exports lazily is not a dependency of its own modules
    for pkg in ("featx", "featx.backbones", "featx.embed", "featx.engines", "featx.heads", "featx.cli"):
        for imported in list(graph.find_modules_directly_imported_by(pkg)):
            graph.remove_import(importer=pkg, imported=imported)
    assert _cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for m in ("a", "a.x", "a.y", "a.z"):
        graph.add_module(m)
    graph.add_import(importer="a.x", imported="a.y")
    graph.add_import(importer="a.y", imported="a.z")
    graph.add_import(importer="a.z", imported="a.x")
    assert _cycles(graph) == [["a.x", "a.y", "a.z"]]


PUBLIC = ["featx", "featx.backbones", "featx.embed", "featx.engines", "featx.heads", "featx.finetune"]


@pytest.mark.parametrize("package", PUBLIC)
def test_public_api_resolves_and_is_documented(package):
    mod = importlib.import_module(package)
    assert mod.__all__, package
    for name in mod.__all__:
        if name == "RayEngine":
            pytest.importorskip("ray")
        obj = getattr(mod, name)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"{package}.{name} has no docstring"


def test_cards_ship_as_the_featx_models_package_data():
    from featx.backbones.cards import card_folder, list_cards

    files = {p.name for p in card_folder().iterdir()}  # models/ (tests/test_packaging.py: the wheel)
    assert "efficientnet_lite0.toml" in files
    assert {c.name for c in list_cards()} >= {"efficientnet_lite0", "resnet50"}
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("featx_models")


def _long_functions(root) -> list[str]:
    """Functions whose body (without the docstring) is over 60 lines and whose docstring
    does not say why ("Long because ...")."""
    import ast
    from pathlib import Path

    out = []
    for p in sorted(Path(root).rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(n) or ""
                if n.end_lineno - n.lineno + 1 - len(doc.splitlines()) > 60 and "Long because" not in doc:
                    out.append(f"{p}:{n.lineno} {n.name}")
    return out


def test_no_function_over_60_lines_without_a_reason(tmp_path):
    from pathlib import Path

    import featx

    assert _long_functions(Path(featx.__file__).parent) == []
    # the check itself finds one
    (tmp_path / "m.py").write_text("def f():\n" + "    x = 1\n" * 70)
    assert _long_functions(tmp_path) == [f"{tmp_path / 'm.py'}:1 f"]


# outside the stack: the root package, `python -m featx`, and featx.backbones' __init__ (its
# modules sit on four floors; it only names them for lazy re-export, importing featx._lazy)
NOT_LAYERED = {"featx", "featx.__main__", "featx.backbones"}


def _contract_layers() -> list[str]:
    from pathlib import Path

    import tomllib

    conf = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    contract = next(c for c in conf["tool"]["importlinter"]["contracts"] if c["type"] == "layers")
    return [name.strip() for layer in contract["layers"] for name in layer.replace(":", "|").split("|")]


def _unplaced(modules, layers: list[str]) -> list[str]:
    """Modules in no layer: neither a layer themselves nor inside a layer's package."""
    return sorted(m for m in modules
                  if m not in NOT_LAYERED and not any(m == la or m.startswith(la + ".") for la in layers))


def test_every_featx_module_is_in_a_layer_of_the_contract():
    """import-linter ignores a module no layer names: a new job module must be placed."""
    modules = grimp.build_graph("featx").modules
    assert _unplaced(modules, _contract_layers()) == []
    # the check itself finds one
    assert _unplaced({"featx.jobx", "featx.heads.fit"}, ["featx.heads"]) == ["featx.jobx"]
