"""Every change this project makes to transformers' modules at run time, in one place.

Each is a faster or leaner way to compute the same values; none changes what a model computes:
- attention: a blocked causal attention function, registered with `AttentionInterface`
  (`models.attention`): torch's CPU kernel is ~30% slower on one causal [n, n] call;
- MLPs: gated MLPs whose forward is llama's are switched (class swap) to an in-place forward
  (`models.mlp`): two fewer [n_tokens, n_ff] tensors alive at the MLP's peak;
- storage: `nn.Linear`/`nn.Embedding` holding 16-bit weights are switched (class swap) to widening
  subclasses (`models.storage`): half the memory of float32 weights;
- experts: the forward of a fused experts module is overridden per instance while collecting
  (`collect.moe`): llama.cpp counts tokens per expert, which transformers' forward does not expose.

They lean on transformers internals, so the versions they were checked against are stated here and
`check_transformers` refuses others before a model is built, instead of computing something else.
"""

from __future__ import annotations

import torch
import transformers

from imatrix.errors import ImatrixError

# the transformers releases these patches were written and tested against: [first, last]
TESTED_TRANSFORMERS = ((5, 0), (5, 99))


def check_transformers(version: str = transformers.__version__) -> None:
    """Refuse a transformers release outside `TESTED_TRANSFORMERS`, and one whose internals moved."""
    major_minor = tuple(int(part) for part in version.split(".")[:2])
    first, last = TESTED_TRANSFORMERS
    if not first <= major_minor <= last:
        raise ImatrixError(f"transformers {version} is not supported (tested: {first[0]}.{first[1]} to "
                           f"{last[0]}.{last[1]}); install 'transformers>=5,<6'")
    from transformers import AttentionInterface
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaMLP

    missing = [what for what, found in (
        ("AttentionInterface.register", hasattr(AttentionInterface, "register")),
        ("the grouped_mm experts function", "grouped_mm" in ALL_EXPERTS_FUNCTIONS),
        ("LlamaMLP.forward", hasattr(LlamaMLP.forward, "__code__")),
    ) if not found]
    if missing:
        raise ImatrixError(f"transformers {version} lacks {', '.join(missing)}, which imatrix patches")


def use_collection_forwards(model: torch.nn.Module) -> None:
    """Attention blocked on the CPU (`models.attention`) and MLPs in place (`models.mlp`): the same
    values as transformers' forwards, faster and in less memory."""
    from imatrix.models.attention import use_blocked_attention
    from imatrix.models.mlp import compute_mlps_in_place

    check_transformers()
    use_blocked_attention(model)
    compute_mlps_in_place(model)
