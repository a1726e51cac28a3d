"""hubconf.py: every registered variant is a torch.hub entry point, and `pretrained=PATH` loads weights."""

from __future__ import annotations

import importlib.util
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sequencer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = sequencer.create_model("sequencer2d_tiny")
    torch.nn.init.normal_(model.head.fc.weight, std=0.5)  # a non-zero head, so the logits show what was loaded
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    sequencer.save_weights(model, path)
    return path, model.eval()


def test_entry_points_are_exactly_the_registry() -> None:
    spec = importlib.util.spec_from_file_location("hubconf_under_test", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # torch.hub's rule for entry points: public callables of the module.
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == set(sequencer.list_models())
    assert hubconf.dependencies == ["torch", "timm"]
    assert "pretrained" in inspect.signature(hubconf.sequencer2d_s).parameters
    assert hubconf.sequencer2d_s_vertical().num_features == 384  # an alias builds too


def test_hub_load_with_a_weights_path_matches_the_saved_model(weights: tuple[Path, torch.nn.Module]) -> None:
    path, reference = weights
    model = torch.hub.load(str(REPO), "sequencer2d_tiny", source="local", pretrained=str(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
    other = torch.hub.load(str(REPO), "sequencer2d_tiny", source="local", num_classes=5)
    assert other.num_classes == 5


@pytest.mark.slow
def test_fresh_clone_without_the_package_installed_uses_its_src(
    weights: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    clone = tmp_path / "clone"
    shutil.copytree(
        REPO / "src" / "sequencer", clone / "src" / "sequencer", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(REPO / "hubconf.py", clone / "hubconf.py")
    path, reference = weights
    installed = Path(sequencer.__file__).resolve().parents[1]  # src/ of an editable install, or site-packages
    # A finder ahead of all others keeps `import sequencer` away from the installed copy, as on a machine without it.
    script = f"""
import importlib.abc, importlib.machinery, pathlib, sys
installed = pathlib.Path({str(installed)!r})

class HideInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "sequencer":
            return None
        search = [p for p in sys.path if pathlib.Path(p or ".").resolve() != installed]
        spec = importlib.machinery.PathFinder.find_spec(name, search)
        if spec is None:
            raise ModuleNotFoundError("No module named 'sequencer'", name=name)
        return spec

sys.meta_path.insert(0, HideInstalled())
try:
    import sequencer
    raise SystemExit("the installed package is still visible")
except ModuleNotFoundError:
    pass
import torch
model = torch.hub.load({str(clone)!r}, "sequencer2d_tiny", source="local", pretrained={str(path)!r}).eval()
torch.manual_seed(1)
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    torch.save(model(x), {str(tmp_path / "logits.pt")!r})
print(sys.modules["sequencer"].__file__)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).is_relative_to(clone / "src")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), reference(x))
