"""imatrix: importance-matrix collection, inspection and imatrix-guided quantization for GGUF models."""

from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix, TensorStats

__all__ = ["ImatrixError", "ImportanceMatrix", "TensorStats", "collect"]
__version__ = "0.1.0"


def collect(*args, **kwargs):  # noqa: ANN002, ANN003 - thin re-export, see imatrix.collect.runner
    """Collect an importance matrix; see `imatrix.collect.runner.collect` for the parameters."""
    from imatrix.collect.runner import collect as _collect

    return _collect(*args, **kwargs)
