"""Fake (meta) implementations of the ``peft_sparse`` ops, so they trace under ``torch.compile`` and run on meta
tensors. They describe only the outputs' shapes, dtypes and devices; see ``reference.py`` for the semantics."""

from __future__ import annotations

import math

import torch

_registered = False


def register_fakes() -> None:
    """Register the fake implementations once (the op schemas must already be loaded)."""
    global _registered
    if _registered:
        return

    @torch.library.register_fake("peft_sparse::scatter_add_")
    def _scatter_add_fake(dense, indices, values):
        return None

    @torch.library.register_fake("peft_sparse::sddmm_gather")
    def _sddmm_gather_fake(grad_output, input, indices, in_features):
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return input.new_empty((indices.shape[0],), dtype=dtype)

    @torch.library.register_fake("peft_sparse::dequant_scatter")
    def _dequant_scatter_fake(
        packed,
        absmax,
        code,
        blocksize,
        shape,
        out_dtype,
        indices,
        values,
        nested_absmax=None,
        nested_code=None,
        nested_blocksize=256,
        offset=0.0,
    ):
        torch._check(packed.numel() * 2 >= math.prod(shape))
        return packed.new_empty(tuple(shape), dtype=out_dtype)

    _registered = True
