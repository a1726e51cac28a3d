"""torch.hub entry points: one per registered variant, e.g.
`torch.hub.load(repo_dir, "sequencer2d_s", source="local", pretrained="weights.pth")`."""

from __future__ import annotations

import pathlib
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing names would otherwise show up as entry points (torch.hub lists every public callable)
    from collections.abc import Callable

    from torch import nn

dependencies = ["torch", "timm"]

try:
    import sequencer as _sequencer
except ImportError:  # a plain clone, not pip-installed: use the package in its src/ folder
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "src"))
    import sequencer as _sequencer


def _entry(name: str) -> Callable[..., nn.Module]:
    """A hub function that builds `name`."""

    def build(pretrained: str | bool | None = None, **kwargs: object) -> nn.Module:
        return _sequencer.create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"{name}: pretrained=PATH loads a checkpoint (authors', timm's or this package's format), pretrained=True the "
        "released ImageNet-1K weights; other keyword arguments go to sequencer.create_model (num_classes, ...)."
    )
    return build


globals().update({_name: _entry(_name) for _name in _sequencer.list_models()})
