"""ckptkeeper: declarative retention for training checkpoints.

`ckptkeeper.lease(checkpoint, for_="2h", note="eval")` pins a checkpoint for an evaluation script's block
(`pinning.lease`); it is imported on first use, so `import ckptkeeper` (and the CLI's start) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ckptkeeper.pinning import PinProblem, PinRefused, lease

_LAZY = {"lease", "PinProblem", "PinRefused"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from ckptkeeper import pinning

        return getattr(pinning, name)
    raise AttributeError(f"module 'ckptkeeper' has no attribute {name!r}")


__all__ = ["PinProblem", "PinRefused", "__version__", "lease"]
