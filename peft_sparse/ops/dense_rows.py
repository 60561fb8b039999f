"""The values' gradient from dense row blocks: ``sddmm_gather`` as a plain matrix product where that is faster.

``g[i] = sum_n grad_output[n, row_i] * input[n, col_i]`` is the weight gradient ``grad_output.T @ input`` read at
the ``k`` indices. The sampled kernels compute only those ``k`` dot products (``2 * k * N`` FLOPs on vector units);
the matrix product computes all ``out * in`` of them (``2 * out * in * N`` FLOPs), but on a GPU's tensor cores
through cuBLAS, hundreds of times faster per FLOP, so above a density of a few tenths of a percent it can win. Here
the product is taken one block of rows at a time (``block_bytes`` of fp32 (fp64) output at most, whatever the layer's
size), with fp32 accumulation (fp64 for fp64 inputs), and each block's entries are gathered from it before the next
block is computed: no dense ``out x in`` gradient is ever alive.

Which one runs is the plan of :func:`sddmm_plan`, set by the environment variable ``PEFT_SPARSE_SDDMM`` (read at
every call): ``sampled`` (the default: the verified kernels), ``dense`` (always this path) or ``auto`` (this path
from the density in ``DENSE_FROM_DENSITY`` for the device type on). The GPU threshold comes from the H200
measurements of the sampled kernel against a dense product plus gather (``benchmarks/RESULTS.md``); this path has
not yet run on a GPU, which is why ``auto`` is not the default.
"""

from __future__ import annotations

import os

import torch

from .reference import check_index_range, check_sddmm_shapes

SDDMM_PLAN_ENV = "PEFT_SPARSE_SDDMM"
PLANS = ("sampled", "dense", "auto")
# Density (k / (out * in)) from which `auto` takes the dense path. CUDA: on the H200 the dense product plus gather
# was 1.3-2.2x faster than the sampled kernel at 0.5 % on 7B shapes, and the FLOP-rate ratio puts the crossing
# near 0.3 %. CPU: on a 2-core AMD EPYC (N = 1024; 1024x1024 and 512x1376; the per-thread-tile sampled kernel of
# 2026-11-28) the dense blocks took 0.49-0.57x the sampled kernel's time at 60 %, 0.69x at 40 %, 1.5-1.6x at 20 %
# and 2.8-3.0x at 10 %.
DENSE_FROM_DENSITY = {"cuda": 0.003, "cpu": 0.3}
BLOCK_BYTES = 64 * 2**20


def sddmm_plan(device: torch.device, num_entries: int, out_features: int, in_features: int) -> str:
    """``"sampled"`` or ``"dense"`` for one call, by ``PEFT_SPARSE_SDDMM`` (see the module docstring)."""
    plan = os.environ.get(SDDMM_PLAN_ENV, "sampled").strip().lower() or "sampled"
    if plan not in PLANS:
        raise ValueError(f"{SDDMM_PLAN_ENV} must be one of {list(PLANS)}, got {plan!r}")
    if plan != "auto":
        return plan
    threshold = DENSE_FROM_DENSITY.get(device.type)
    numel = out_features * in_features
    return "dense" if threshold is not None and numel and num_entries >= threshold * numel else "sampled"


def sddmm_gather_dense_rows(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    indices: torch.Tensor,
    in_features: int,
    block_bytes: int | None = None,
) -> torch.Tensor:
    """:func:`peft_sparse.ops.sddmm_gather` (same arguments, same result dtype) from row blocks of
    ``grad_output.T @ input`` of at most ``block_bytes`` each (default ``BLOCK_BYTES``, read at the call; a block
    holds one row at least). ``indices`` need not be sorted."""
    check_sddmm_shapes(grad_output, input, in_features)
    acc_dtype = torch.float64 if torch.float64 in (grad_output.dtype, input.dtype) else torch.float32
    out_features, k = grad_output.shape[1], indices.numel()
    if k == 0 or input.shape[0] == 0:
        return torch.zeros(k, dtype=acc_dtype, device=grad_output.device)
    check_index_range(indices, out_features * in_features, "sddmm_gather")
    flat = indices.long()
    order = None
    if k > 1 and not bool((flat[1:] >= flat[:-1]).all()):
        flat, order = torch.sort(flat)
    row_bytes = in_features * acc_dtype.itemsize  # one row of the product, in the dtype it is computed in
    rows_per_block = max(1, (BLOCK_BYTES if block_bytes is None else block_bytes) // row_bytes)
    starts = torch.arange(0, out_features + 1, rows_per_block, device=flat.device) * in_features
    bounds = torch.searchsorted(flat, starts).tolist() + [k]
    gathered = torch.empty(k, dtype=acc_dtype, device=grad_output.device)
    for block, row in enumerate(range(0, out_features, rows_per_block)):
        lo, hi = bounds[block], bounds[block + 1]
        if lo == hi:  # no entry in these rows: nothing to compute
            continue
        rows = grad_output[:, row : row + rows_per_block].t()
        product = _product_fp32(rows, input, acc_dtype)
        gathered[lo:hi] = product.view(-1)[flat[lo:hi] - row * in_features]
    if order is None:
        return gathered
    return torch.empty_like(gathered).index_copy_(0, order, gathered)  # back to the caller's order


def _product_fp32(a: torch.Tensor, b: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` accumulated and returned in ``acc_dtype``: half-precision operands stay half on CUDA (tensor cores,
    ``mm(..., out_dtype=float32)``) and are widened elsewhere."""
    if a.is_cuda and acc_dtype == torch.float32 and a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.to(acc_dtype), b.to(acc_dtype))
