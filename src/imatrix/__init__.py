"""imatrix: importance-matrix collection, inspection and imatrix-guided quantization for GGUF models."""

from imatrix import collect  # callable: imatrix.collect(model, text_file, options) runs a collection
from imatrix.errors import ImatrixError
from imatrix.matrix import ImportanceMatrix, TensorStats

__all__ = ["ImatrixError", "ImportanceMatrix", "TensorStats", "collect"]
__version__ = "0.1.0"
