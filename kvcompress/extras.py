"""Optional dependencies: the core install is what generation with a compressor needs; the rest are extras."""

from __future__ import annotations

import importlib.util


def require(module: str, extra: str, purpose: str) -> None:
    """Raise a clear error naming the extra to install when `module` (needed for `purpose`) is missing."""
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{purpose} needs the '{module}' package, which is not installed. Install it with:  pip install \"kvcompress[{extra}]\"")
