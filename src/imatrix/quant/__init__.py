"""Quantization kernels; importing this package registers every supported type."""

import imatrix.quant.iq4  # noqa: F401  (registers IQ4_NL, IQ4_XS)
import imatrix.quant.legacy  # noqa: F401  (registers Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
