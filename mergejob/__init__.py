"""mergejob: bake PEFT adapters into a base model and publish it, at any scale."""

from mergejob.errors import MergeJobError
from mergejob.pipeline import MergeResult, merge, prepare
from mergejob.spec import MergeSpec

__all__ = ["MergeJobError", "MergeResult", "MergeSpec", "__version__", "merge", "prepare"]
__version__ = "0.1.0"
