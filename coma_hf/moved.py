"""Names that moved between modules keep importing from their old place for one release, with a warning: the one
rule both old places (`coma_hf.evaluation.mmeb_v2`, `coma_hf.training.recipes`) use as their module `__getattr__`."""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3.0"  # the release after which the old places stop answering


def moved_names(module: str, moved: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `module` that answers each name of `moved` (name → its new module) with a
    `DeprecationWarning` and the object from its new module; any other name is an `AttributeError`."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        message = f"{module}.{name} moved to {moved[name]}; the old place goes in {REMOVED_IN}"
        warnings.warn(message, DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(moved[name]), name)

    return __getattr__
