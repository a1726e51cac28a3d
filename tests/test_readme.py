"""The README's Python snippets run as written, and what it says of the registry is true."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

import sequencer
from sequencer.choices import EXPORT_PAYS_OFF_AT
from sequencer.model import VARIANTS

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
PYTHON_BLOCKS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.DOTALL | re.MULTILINE)


def test_every_python_block_of_the_readme_is_found() -> None:
    assert PYTHON_BLOCKS and len(PYTHON_BLOCKS) == README.count("```python")


def test_the_variant_table_and_list_models_name_every_registered_variant() -> None:
    table = README[README.index("### Variants") : README.index("MACs at 224 px")]
    names = set()
    for cell in re.findall(r"^\| (.*?) \|", table, flags=re.MULTILINE):
        for name in re.findall(r"`([^`]+)`", cell):
            # `sequencer2d_{s,m,l}_392` stands for three names.
            head, choices, tail = re.fullmatch(r"([^{]*)(?:\{(.*)\})?(.*)", name).groups()
            names.update(f"{head}{choice}{tail}" for choice in (choices.split(",") if choices else [""]))
    assert names == set(sequencer.list_models())
    counted = f"sequencer.list_models()  # all {len(sequencer.list_models())} names: the {len(VARIANTS)} variants"
    assert counted in README


@pytest.fixture(scope="module")
def readers_folder(tmp_path_factory: pytest.TempPathFactory, fill_hub_cache, to_authors_format) -> Path:
    """Where a reader runs the snippets: sequencer2d_s.pth (the authors' format), cat.jpg, a clone in ./sequencer."""
    folder = tmp_path_factory.mktemp("reader")
    weights = sequencer.create_model("sequencer2d_s").state_dict()
    torch.save({"model": to_authors_format(weights)}, folder / "sequencer2d_s.pth")
    fill_hub_cache(folder / "hf-cache", "timm/sequencer2d_s.in1k", "model.safetensors", weights)
    Image.new("RGB", (320, 240), (180, 120, 60)).save(folder / "cat.jpg")
    (folder / "sequencer").symlink_to(REPO, target_is_directory=True)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(PYTHON_BLOCKS)), ids=lambda number: f"block{number + 1}")
def test_python_blocks_run_as_written(
    readers_folder: Path, number: int, monkeypatch: pytest.MonkeyPatch, offline_cache: Path
) -> None:
    """Each block alone, in a fresh namespace, in a folder holding the files it names; the Hub is its cache here."""
    for item in (readers_folder / "hf-cache").iterdir():
        (offline_cache / item.name).symlink_to(item, target_is_directory=True)
    monkeypatch.chdir(readers_folder)
    exec(compile(PYTHON_BLOCKS[number], f"README.md python block {number + 1}", "exec"), {"__name__": "__readme__"})


def test_each_block_names_only_what_it_defines_or_imports() -> None:
    """The mistake the blocks had: `x`, `images`, `model` used, never defined (caught here without running them)."""
    for number, block in enumerate(PYTHON_BLOCKS, 1):
        tree = ast.parse(block)
        defined = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                defined.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                defined.add(node.id)
        used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
        assert used <= defined, f"block {number} uses {sorted(used - defined)} without defining them"


def test_the_readme_says_from_how_many_images_predict_exports() -> None:
    assert f"The first run of {EXPORT_PAYS_OFF_AT:,} images or more" in README
    assert f"a run of {EXPORT_PAYS_OFF_AT:,}+ images" in README
