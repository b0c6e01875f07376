"""mergejob: bake PEFT adapters into a base model and publish it, at any scale.

Example::

    import mergejob
    spec = mergejob.MergeSpec.model_validate(
        {"base": "org/base", "adapters": ["org/adapter"], "output": {"dir": "./merged"}}
    )
    print(mergejob.merge(spec).summary())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mergejob.errors import MergeJobError
    from mergejob.extraction.job import ExtractResult, extract
    from mergejob.pipeline import MergeResult, merge, prepare
    from mergejob.spec import MergeSpec

__all__ = [
    "ExtractResult",
    "MergeJobError",
    "MergeResult",
    "MergeSpec",
    "__version__",
    "extract",
    "merge",
    "prepare",
]
__version__ = "0.1.0"

# Loaded on first use: `mergejob --help`, `render` and `schema` import this package, and the
# pipeline would bring torch and transformers with it (seconds, for a command that needs none).
_LAZY = {
    "merge": "mergejob.pipeline",
    "prepare": "mergejob.pipeline",
    "MergeResult": "mergejob.pipeline",
    "MergeSpec": "mergejob.spec",
    "MergeJobError": "mergejob.errors",
    "extract": "mergejob.extraction.job",
    "ExtractResult": "mergejob.extraction.job",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mergejob' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
