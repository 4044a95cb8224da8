"""Quantization kernels; importing this package registers every supported type (see `base.py` for
how a type is added, `blocks.py` for the operations kernels share, `mixes.py` for llama-quantize's mixes)."""

import imatrix.quant.hifi  # noqa: F401  (registers Q3_K_HIFI, our own outlier type)
import imatrix.quant.iq1  # noqa: F401  (registers IQ1_S, IQ1_M)
import imatrix.quant.iq2  # noqa: F401  (registers IQ2_XXS, IQ2_XS, IQ2_S)
import imatrix.quant.iq3  # noqa: F401  (registers IQ3_XXS, IQ3_S)
import imatrix.quant.iq4  # noqa: F401  (registers IQ4_NL, IQ4_XS)
import imatrix.quant.kquants  # noqa: F401  (registers Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)
import imatrix.quant.legacy  # noqa: F401  (registers Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)
import imatrix.quant.mxfp4  # noqa: F401  (registers MXFP4)
import imatrix.quant.q1q2  # noqa: F401  (registers Q1_0, Q2_0)
import imatrix.quant.ternary  # noqa: F401  (registers TQ1_0, TQ2_0)
