"""ckptkeeper: declarative retention for training checkpoints.

`ckptkeeper.lease(checkpoint, for_="2h", note="eval")` pins a checkpoint for an evaluation script's block
(`pinning.lease`); it is imported on first use, so `import ckptkeeper` (and the CLI's start) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ckptkeeper.pinning import PinProblem, PinRefused, lease
    from ckptkeeper.pins import PinsError

_LAZY = {"lease": "pinning", "PinProblem": "pinning", "PinRefused": "pinning", "PinsError": "pins"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"ckptkeeper.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'ckptkeeper' has no attribute {name!r}")


__all__ = ["PinProblem", "PinRefused", "PinsError", "__version__", "lease"]
