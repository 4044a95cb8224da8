"""imatrix: importance-matrix collection, inspection and imatrix-guided quantization for GGUF models.

The public API (`imatrix.api`): `collect`, `merge`, `convert`, `quantize`, `perplexity`, and `load`,
`load_many`, `save` for imatrix files, each with its options (`imatrix.options`) and a `Reporter`.
Runnable examples: docs/examples/api.py.
"""

from imatrix.api import collect, convert, load, load_many, merge, perplexity, quantize, save
from imatrix.errors import ImatrixError, ImatrixWarning
from imatrix.matrix import ImportanceMatrix, TensorStats
from imatrix.options import CollectOptions, ConvertOptions, MergeOptions, PerplexityOptions, QuantizeOptions
from imatrix.reporter import Reporter

__all__ = [
    "CollectOptions",
    "ConvertOptions",
    "ImatrixError",
    "ImatrixWarning",
    "ImportanceMatrix",
    "MergeOptions",
    "PerplexityOptions",
    "QuantizeOptions",
    "Reporter",
    "TensorStats",
    "collect",
    "convert",
    "load",
    "load_many",
    "merge",
    "perplexity",
    "quantize",
    "save",
]
__version__ = "0.1.0"
