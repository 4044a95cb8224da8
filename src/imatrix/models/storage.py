"""Weights kept at 16 bits when the file stores them so, widened to the compute dtype per matmul.

A float32 run of an F16 or BF16 model would otherwise hold every weight twice as large as the file
does (SmolLM2-135M: 0.54 GB instead of 0.27 GB). Widening is exact, so the results are the same
bits; it costs one conversion of each weight per forward (~1% of the matmul time on CPU).
On CPU the 16-bit weights are the file's own bytes, used in place from its mmap (`models.loader`):
a module given `release_pages` hands its weight's pages back after each widening, so only the
layer being computed is resident; the next forward reads them back from the page cache.
Only parameters of plain `nn.Linear` and `nn.Embedding` modules are kept narrow: other modules
(MoE routers and expert stacks, norms) read their weights directly in the compute dtype.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

import gguf
import torch
import torch.nn.functional as F

from imatrix.models.patches import swap_class

# GGUF tensor type -> the torch dtype that holds its values exactly in 16 bits
_EXACT_16_BIT = {gguf.GGMLQuantizationType.F16: torch.float16, gguf.GGMLQuantizationType.BF16: torch.bfloat16}


# weights up to this many values are widened whole; larger ones (a 49k-token output projection)
# a block of rows at a time, so that no full-size float32 copy is ever made
WIDEN_WHOLE_MAX_VALUES = 1 << 22


PageRelease = Callable[[torch.Tensor], None]


class WideningLinear(torch.nn.Linear):
    """An `nn.Linear` whose weight is stored narrower than its input and widened for each call.

    With `file_order_head_rows` set, the weight is a llama q/k projection read in place from a GGUF
    file, its rows still in the order llama.cpp's converter wrote them (`LlamaModel.permute`); the
    widened copy is put in checkpoint order on the way, so `forward` is the checkpoint's. Reading the
    rows through a reordering copy at load time would hold a second 16-bit set of them instead.
    """

    release_pages: PageRelease | None = None  # set when the weight is read in place from a mapped file
    file_order_head_rows: int = 0  # rows per attention head when the rows are in the GGUF file's order
    input_siblings: SharedInputLinears | None = None  # set when computed jointly with siblings

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - nn.Linear's own signature
        if self.input_siblings is not None and not torch.is_grad_enabled():
            return self.input_siblings.output_of(self, input)
        return self.own_output(input)

    def own_output(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        """This Linear's output alone."""
        if self.weight.numel() <= WIDEN_WHOLE_MAX_VALUES:
            return self._widened_linear(input, self.weight, self.bias)
        output = input.new_empty(*input.shape[:-1], self.out_features)
        for rows in output_blocks(self):  # whole heads each, for rows in file order
            output[..., rows] = linear_rows(self, input, rows)
        return output

    def _widened_linear(self, input: torch.Tensor, weight: torch.Tensor,  # noqa: A002
                        bias: torch.Tensor | None) -> torch.Tensor:
        wide = widened(weight, input.dtype, self.file_order_head_rows)
        if self.release_pages is not None:
            self.release_pages(weight)
        return F.linear(input, wide, None if bias is None else bias.to(input.dtype))


class SharedInputLinears:
    """Sibling WideningLinears that read the very same input (llama's q/k/v projections, a gated MLP's
    gate/up ones) computed as one matmul over their weights widened side by side.

    The widened weights are a per-call copy anyway, so joining them costs no memory, and one wider
    matmul runs faster than narrow ones (SmolLM2's k and v projections have 192 rows each): a
    two-thread SmolLM2 forward ~1.5% faster, with the same bits in every output under MKL's AVX-512 sgemm (other
    kernels may round a column differently in a wider matrix, in the last bits). The first member's call computes
    all the outputs; each other member takes its own (a view of the joint output) once, on a call with
    the same input tensor, and computes it alone otherwise.
    """

    def __init__(self, members: list[WideningLinear]) -> None:
        self.members = members
        self.rows = [member.out_features for member in members]
        self._pending = threading.local()  # .input, .outputs: per thread, as chunks run in threads

    def output_of(self, member: WideningLinear, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        if member is not self.members[0]:
            outputs = getattr(self._pending, "outputs", None)
            if outputs and member in outputs and self._pending.input is input:
                output = outputs.pop(member)
                if not outputs:
                    self._pending.input = self._pending.outputs = None
                return output
            return member.own_output(input)
        joint = F.linear(input, self._widened(input.dtype))
        outputs = dict(zip(self.members, joint.split(self.rows, dim=-1), strict=True))
        output = outputs.pop(member)
        # holding the input itself: an `is` test against a live tensor cannot match a new one at its address
        self._pending.input, self._pending.outputs = input, outputs
        return output

    def _widened(self, dtype: torch.dtype) -> torch.Tensor:
        first = self.members[0].weight
        joint = _scratch_buffer((sum(self.rows), first.shape[1]), dtype, first.device)
        for member, rows in zip(self.members, joint.split(self.rows), strict=True):
            widen_into(rows, member.weight, member.file_order_head_rows)
            if member.release_pages is not None:
                member.release_pages(member.weight)
        return joint


# the Linears of a module that read the same input, by attribute name
SHARED_INPUT_LINEARS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def join_shared_input_linears(model: torch.nn.Module) -> int:
    """Compute each module's q/k/v (and gate/up) WideningLinears jointly (`SharedInputLinears`) where
    they have no bias and their widened weights together fit one whole widening; returns how many
    groups were joined. Every architecture we run feeds them one input; one that did not would still
    get the right outputs, each computed alone."""
    joined = 0
    for module in model.modules():
        for names in SHARED_INPUT_LINEARS:
            members = [getattr(module, name, None) for name in names]
            if _joinable(members):
                siblings = SharedInputLinears(members)
                for member in members:
                    member.input_siblings = siblings
                joined += 1
    return joined


def _joinable(members: list[torch.nn.Module | None]) -> bool:
    if not all(isinstance(member, WideningLinear) and member.bias is None for member in members):
        return False
    weights = [member.weight for member in members]
    return (len({(weight.shape[1], weight.dtype, weight.device) for weight in weights}) == 1
            and sum(weight.numel() for weight in weights) <= WIDEN_WHOLE_MAX_VALUES)


_scratch = threading.local()


def _scratch_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's reusable buffer for a shape: valid until the next call for the same shape."""
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    key = (tuple(shape), dtype, device)
    buffer = buffers.get(key)
    if buffer is None:
        buffer = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def widened(weight: torch.Tensor, dtype: torch.dtype, file_order_head_rows: int = 0) -> torch.Tensor:
    """`weight` converted to `dtype` (and its rows put in checkpoint order, for rows in a GGUF file's q/k
    order of `file_order_head_rows` per head), valid until the next call for the same shape in this thread.

    Without autograd the widened copy lives for one matmul, so one buffer per shape is reused: a
    fresh one per call is 0.5 GB of multi-MB allocations per SmolLM2 forward, which left glibc's
    heap larger by up to 0.2 GB. With autograd the matmul keeps its weight: a copy each time.
    """
    if torch.is_grad_enabled():
        wide = weight.to(dtype)
        return checkpoint_row_order(wide, file_order_head_rows) if file_order_head_rows else wide
    return widen_into(_scratch_buffer(tuple(weight.shape), dtype, weight.device), weight, file_order_head_rows)


def widen_into(out: torch.Tensor, weight: torch.Tensor, file_order_head_rows: int = 0) -> torch.Tensor:
    """`weight` converted into `out` (its rows in checkpoint order, for `file_order_head_rows` per head)."""
    if file_order_head_rows:
        return checkpoint_row_order(weight, file_order_head_rows, out=out)
    return out.copy_(weight)


def checkpoint_row_order(rows: torch.Tensor, head_rows: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """q/k projection rows in the order llama.cpp's converter writes them (`LlamaModel.permute`: each
    head's two rotary halves interleaved) put back in checkpoint order, into `out` if given."""
    n_head, cols = rows.shape[0] // head_rows, rows.shape[1]
    checkpoint_view = rows.view(n_head, head_rows // 2, 2, cols).transpose(1, 2)
    if out is None:
        return checkpoint_view.reshape(rows.shape)
    out.view(n_head, 2, head_rows // 2, cols).copy_(checkpoint_view)
    return out


def output_blocks(linear: torch.nn.Linear, max_values: int | None = None) -> list[slice]:
    """Blocks of output rows of at most `max_values` weights (default: small enough to widen at
    once; one block for most weights), whole attention heads for rows in a GGUF file's q/k order."""
    rows_per_block = max(1, (max_values or WIDEN_WHOLE_MAX_VALUES) // linear.in_features)
    head_rows = getattr(linear, "file_order_head_rows", 0)
    if head_rows:
        rows_per_block = max(head_rows, rows_per_block // head_rows * head_rows)
    return [slice(first, first + rows_per_block) for first in range(0, linear.out_features, rows_per_block)]


def linear_rows(linear: torch.nn.Linear, input: torch.Tensor, rows: slice) -> torch.Tensor:  # noqa: A002
    """The output features `rows` of `linear(input)`, for a plain or a widening Linear."""
    weight, bias = linear.weight[rows], None if linear.bias is None else linear.bias[rows]
    if isinstance(linear, WideningLinear):
        return linear._widened_linear(input, weight, bias)
    return F.linear(input, weight, bias)


class WideningEmbedding(torch.nn.Embedding):
    """An `nn.Embedding` stored narrower than the compute dtype: looked-up rows are widened."""

    compute_dtype: torch.dtype = torch.float32
    release_pages: PageRelease | None = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        rows = super().forward(input).to(self.compute_dtype)
        if self.release_pages is not None:
            self.release_pages(self.weight)
        return rows


def exact_16_bit_dtype(tensor_type: enum.IntEnum) -> torch.dtype | None:
    """The 16-bit torch dtype whose bit patterns are this GGUF type's (F16, BF16), else None."""
    return _EXACT_16_BIT.get(tensor_type)


def storage_dtype(tensor_type: enum.IntEnum, compute_dtype: torch.dtype, round_to_f16: bool = False) -> torch.dtype:
    """The dtype a weight of this GGUF type is kept in for a `compute_dtype` run.

    16-bit file types stay 16-bit under float32 compute; with `round_to_f16` every non-F32 weight
    is rounded to float16 anyway, so it is kept as float16 too.
    """
    if compute_dtype != torch.float32:
        return compute_dtype
    if round_to_f16 and tensor_type != gguf.GGMLQuantizationType.F32:
        return torch.float16
    return exact_16_bit_dtype(tensor_type) or compute_dtype


def narrow_capable_parameters(model: torch.nn.Module) -> set[str]:
    """Names of the parameters that may be stored narrower than the compute dtype."""
    names = set()
    for module_name, module in model.named_modules():
        if type(module) in (torch.nn.Linear, torch.nn.Embedding):
            prefix = f"{module_name}." if module_name else ""
            names.update(f"{prefix}{param}" for param, _ in module.named_parameters(recurse=False))
    return names


def widen_narrow_modules(model: torch.nn.Module, compute_dtype: torch.dtype,
                         release_pages: PageRelease | None = None) -> None:
    """Make every Linear/Embedding whose weight is narrower than `compute_dtype` widen it on use
    (and then call `release_pages` with the narrow weight, or the block of it, just read).

    The module objects stay the same (their class is swapped), so hooks and tied weights keep working.
    Linears that read the same input are then computed jointly (`join_shared_input_linears`).
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dtype == compute_dtype:
            continue
        if type(module) is torch.nn.Linear:
            swap_class(module, WideningLinear)
        elif type(module) is torch.nn.Embedding:
            swap_class(module, WideningEmbedding)
            module.compute_dtype = compute_dtype
        else:
            continue
        module.release_pages = release_pages
    join_shared_input_linears(model)
