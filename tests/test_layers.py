"""The package's layers import one way: errors, kernels <- model <- checkpoint <- builder <- library functions <-
commands."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sequencer

PACKAGE = Path(sequencer.__file__).parent
# What the bottom layers may import from the package; everything else in it sits above them.
LOWER_LAYERS = {
    "sequencer.errors": set(),
    "sequencer.choices": set(),
    "sequencer.kernels.onednn": set(),
    # The kernels sit below the model, whose mixers and linears show which one runs.
    "sequencer.recurrence": {"sequencer.kernels.onednn"},
    "sequencer.model": {"sequencer.choices", "sequencer.errors", "sequencer.kernels.onednn", "sequencer.recurrence"},
    "sequencer.files": set(),
    # checkpoint reads local files only: fetching from the Hub or a URL is the builder's (through sequencer.hub). It
    # reads the variant table, to record how a model's architecture differs from its variant's.
    "sequencer.checkpoint": {"sequencer.choices", "sequencer.errors", "sequencer.files", "sequencer.model"},
    "sequencer.hub": {"sequencer.checkpoint", "sequencer.errors"},
    "sequencer.builder": {
        "sequencer.checkpoint",
        "sequencer.choices",
        "sequencer.errors",
        "sequencer.hub",
        "sequencer.model",
    },
}
# The parsers: `sequencer.options` builds them (the flags as data, which the library reads too, live in
# `sequencer.config` and `sequencer.train_config`).
COMMAND_LAYER = ("sequencer.cli", "sequencer.commands", "sequencer.__main__", "sequencer.options")


def module_name(path: Path) -> str:
    """The dotted name of a source file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(path: Path) -> set[str]:
    """The package modules a file imports anywhere in it (module level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from sequencer.kernels import onednn` imports the submodule; `from sequencer.model import X` the module.
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                names.add(
                    candidate
                    if (PACKAGE.parent / candidate.replace(".", "/")).with_suffix(".py").exists()
                    else node.module
                )
    return {name for name in names if name == "sequencer" or name.startswith("sequencer.")}


GRAPH = {module_name(path): package_imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_graph_covers_the_package() -> None:
    assert {"sequencer.model", "sequencer.builder", "sequencer.validate", "sequencer.commands.validate"} <= set(GRAPH)


@pytest.mark.parametrize("module", sorted(LOWER_LAYERS))
def test_a_bottom_layer_imports_only_the_layers_below_it(module: str) -> None:
    assert GRAPH[module] <= LOWER_LAYERS[module], f"{module} imports {sorted(GRAPH[module] - LOWER_LAYERS[module])}"


def test_no_work_module_imports_the_command_layer() -> None:
    offenders = {
        module: sorted(name for name in imports if name.startswith(COMMAND_LAYER))
        for module, imports in GRAPH.items()
        if not module.startswith(COMMAND_LAYER)
    }
    assert not {module: names for module, names in offenders.items() if names}


def test_no_import_cycle_even_through_imports_inside_functions() -> None:
    # The package's __init__ imports lazily by name (its _EXPORTS table) and nothing imports it for code: left out.
    graph = {module: imports - {"sequencer"} for module, imports in GRAPH.items() if module != "sequencer"}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = [*path[path.index(module) :], module]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if module in done:
            return
        for imported in sorted(graph.get(module, ())):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_the_model_file_does_no_io() -> None:
    tree = ast.parse((PACKAGE / "model.py").read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & {"os", "pathlib", "urllib", "requests", "huggingface_hub", "safetensors", "io", "shutil"}
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "open" not in calls
    assert "torch.load" not in ast.unparse(tree) and "torch.hub" not in ast.unparse(tree)
