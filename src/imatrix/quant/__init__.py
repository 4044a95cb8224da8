"""Quantization kernels; importing this package registers every supported type."""

import imatrix.quant.hifi  # noqa: F401  (registers Q3_K_HIFI, our own outlier type)
import imatrix.quant.iq4  # noqa: F401  (registers IQ4_NL, IQ4_XS)
import imatrix.quant.kquants  # noqa: F401  (registers Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
import imatrix.quant.legacy  # noqa: F401  (registers Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
