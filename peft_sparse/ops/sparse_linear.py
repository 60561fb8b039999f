"""``y = x (W0 + scatter(indices, values))^T + b`` as one autograd function.

Why a custom function rather than ``F.linear(x, W0 + delta)``: autograd would save the merged dense weight for the
backward pass and produce a dense ``out x in`` gradient for it before gathering the ``k`` entries that matter. Here
the backward recomputes the merged weight (one scatter into a copy of ``W0``, in the compute dtype) to get the input
gradient, and gets the values' gradient straight from the sampled gather
``g[i] = sum_n dy[n, row_i] x[n, col_i]``, so the only dense ``out x in`` tensor ever alive is the merged weight in
the compute dtype, and only during one layer's forward or backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .functional import scatter_add, sddmm_gather


def merged_weight(
    weight: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    fan_in_fan_out: bool,
    dtype: torch.dtype,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``W0 + delta`` (``+ offset`` if given) as a new contiguous ``(out, in)`` tensor of ``dtype``;
    ``weight`` is not modified.

    ``fan_in_fan_out`` marks a weight stored as ``(in, out)`` (GPT-2 ``Conv1D``); the result is always in the
    logical ``(out, in)`` layout that ``F.linear`` expects. ``offset`` is a dense ``(out, in)`` tensor (only salience
    selection uses it).
    """
    logical = weight.t() if fan_in_fan_out else weight
    merged = scatter_add(logical.to(dtype=dtype, memory_format=torch.contiguous_format, copy=True), indices, values)
    if offset is not None:
        merged += offset.to(dtype)
    return merged


def _materialise(weight, indices, values, fan_in_fan_out, dtype, offset, dequantize):
    """The merged dense weight the layer computes with: from a plain weight, or through ``dequantize``."""
    if dequantize is None:
        return merged_weight(weight, indices, values, fan_in_fan_out, dtype, offset)
    merged = dequantize(indices, values, dtype)
    if offset is not None:
        merged += offset.to(dtype)
    return merged


class _SparseLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, weight, bias, indices, values, fan_in_fan_out, grad_sink=None, weight_offset=None, dequantize=None
    ):
        compute_dtype = x.dtype
        merged = _materialise(weight, indices, values, fan_in_fan_out, compute_dtype, weight_offset, dequantize)
        out = torch.nn.functional.linear(x, merged, None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(x, weight, indices, values)
        ctx.fan_in_fan_out = fan_in_fan_out
        ctx.grad_sink = grad_sink
        ctx.weight_offset = weight_offset
        ctx.dequantize = dequantize
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, indices, values = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, _, needs_values = ctx.needs_input_grad[:5]
        in_features = x.shape[-1]
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        # Under autocast the forward multiplied in the autocast dtype (the gradient's), not in x's.
        x_2d = x.reshape(-1, in_features).to(grad_2d.dtype)
        grad_x = grad_weight = grad_bias = grad_values = None
        if needs_x:
            merged = _materialise(
                weight, indices, values, ctx.fan_in_fan_out, grad_out.dtype, ctx.weight_offset, ctx.dequantize
            )
            grad_x = (grad_2d @ merged).reshape(x.shape).to(x.dtype)
            del merged
        if needs_values:
            grad_values = sddmm_gather(grad_2d, x_2d, indices, in_features).to(values.dtype)
        if needs_weight and ctx.dequantize is None:
            # The base weight is frozen in every peft-sparse setup; this branch only keeps the function a correct
            # autograd citizen if a caller unfreezes it.
            grad_logical = grad_2d.t().to(weight.dtype) @ x_2d.to(weight.dtype)
            grad_weight = grad_logical.t() if ctx.fan_in_fan_out else grad_logical
        if needs_bias and ctx.has_bias:
            grad_bias = grad_2d.sum(dim=0).to(ctx.bias_dtype)
        if ctx.grad_sink is not None:
            # Salience selection: the layer's dense weight gradient, built here from the layer's own input and
            # output gradient, so it works whatever the base weight is stored as.
            ctx.grad_sink(grad_2d, x_2d)
        return grad_x, grad_weight, grad_bias, None, grad_values, None, None, None, None


def sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    values: torch.Tensor,
    fan_in_fan_out: bool = False,
    grad_sink: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    weight_offset: torch.Tensor | None = None,
    dequantize: Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Linear layer with a sparse additive delta on a frozen weight.

    Args:
        x: input of shape ``(..., in)``. Its dtype is the compute dtype (callers cast it to the weight's dtype
            first, as peft's LoRA layers do).
        weight: base weight, ``(out, in)``, or ``(in, out)`` when ``fan_in_fan_out`` is set.
        bias: optional bias of shape ``(out,)``.
        indices: 1-D integer row-major flat positions into the logical ``(out, in)`` weight.
        values: 1-D delta values (any floating dtype; typically float32 while the weight is bf16/fp16). Their
            gradient comes back in their own dtype.
        fan_in_fan_out: whether ``weight`` is stored transposed (GPT-2 ``Conv1D``).
        grad_sink: salience selection only: called in the backward as ``grad_sink(grad_output_2d, input_2d)``, so
            the caller can accumulate the dense weight gradient ``grad_output_2d.T @ input_2d`` as it chooses.
        weight_offset: salience selection only: a dense ``(out, in)`` tensor added to the merged weight (GRaSP's
            finite-difference Hessian-vector product evaluates the gradient at a perturbed weight).
        dequantize: for a quantised base (``weight`` is then its packed storage, frozen): a function
            ``dequantize(indices, values, dtype)`` returning the dense ``(out, in)`` weight in ``dtype`` with the delta
            added, e.g. one :func:`peft_sparse.ops.dequant_scatter_4bit` pass. Called in the forward and again in
            the backward, so no dense copy is kept between them.

    Returns:
        ``x @ (W0 + delta)^T + bias`` of shape ``(..., out)`` in ``x.dtype``.
    """
    if indices.dim() != 1 or indices.shape != values.shape:
        raise ValueError(
            f"sparse_linear: `indices` and `values` must be 1-D of equal length, got {tuple(indices.shape)} and "
            f"{tuple(values.shape)}"
        )
    return _SparseLinearFunction.apply(
        x, weight, bias, indices, values, fan_in_fan_out, grad_sink, weight_offset, dequantize
    )
