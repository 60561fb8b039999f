"""Sparse adapters over bitsandbytes quantised layers (QLoRA-style sparse fine-tuning).

* :class:`Linear4bit` wraps ``bitsandbytes.nn.Linear4bit`` (NF4 or FP4, with or without double quantisation, any
  ``quant_storage``). Its forward dequantises the packed weight and adds the delta in one pass
  (:func:`peft_sparse.ops.dequant_scatter_4bit`), multiplies, and drops the dense weight; the backward dequantises
  again for the input gradient and takes the values' gradient from the sampled gather, so no dense copy of the
  weight lives longer than one layer's forward or backward.
* :class:`Linear8bitLt` wraps ``bitsandbytes.nn.Linear8bitLt`` (LLM.int8() weights, ``has_fp16_weights=False``):
  the row-wise int8 weight is dequantised with bitsandbytes' own formula and the delta scattered in.

Merging into a quantised weight means dequantise, add, re-quantise: the merged weight carries a new rounding error
(bounded by the quantisation step of each block / row), so merging warns once. ``unmerge`` does not subtract (that
would round twice): the layer keeps the original quantised weight object from the first merge until unmerge and
puts it back, so unmerge restores the exact original bytes. The price is one extra quantised copy of the weight
(about a quarter of a bf16 copy for 4-bit) while a layer is merged; ``merge_and_unload`` discards the wrapper and
with it that copy.

Dispatch follows peft's LoRA pattern: :func:`dispatch_bnb` returns a new module for a supported bitsandbytes layer
and ``None`` otherwise.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .._distributed import whole
from ..ops import dequant_scatter_4bit, scatter_add, sparse_linear
from .config import SparseConfig
from .layer import SparseLayer

_requantisation_warned = False


def _warn_requantisation_once() -> None:
    global _requantisation_warned
    if _requantisation_warned:
        return
    _requantisation_warned = True
    warnings.warn(
        "Merging a sparse adapter into a quantised (bitsandbytes) weight dequantises it, adds the delta and "
        "re-quantises: the merged weight carries a new rounding error of up to one quantisation step per block, so "
        "its outputs differ slightly from the unmerged adapter's. unmerge() restores the original bytes exactly.",
        UserWarning,
        stacklevel=3,
    )


def _sorted_delta(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused 4-bit op needs ascending indices; a single adapter's are, a concatenation of several may not be."""
    if indices.numel() < 2 or bool((indices[1:] >= indices[:-1]).all()):
        return indices, values
    indices, order = torch.sort(indices, stable=True)
    return indices, values[order]


class _QuantisedSparseLayer(nn.Module, SparseLayer):
    """Forward, merge and unmerge shared by the quantised layer types; subclasses say how to dequantise and
    re-quantise their weight."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: SparseConfig,
        layer_name: str = "",
        **kwargs,
    ) -> None:
        super().__init__()
        SparseLayer.__init__(self, base_layer, layer_name=layer_name, fan_in_fan_out=False, **kwargs)
        self._active_adapter = adapter_name
        # The quantised weight as it was before the first merge (a plain dict: not a parameter, not saved).
        self._premerge: dict[str, Any] = {}
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_pre_hook(self._load_sparse_state_pre_hook)

    # --- what each quantised type provides -------------------------------------------------------------------
    def _dequantizer(self) -> Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor]:
        """A function ``(indices, values, dtype) -> dense (out, in) weight + delta`` for the current weight."""
        raise NotImplementedError

    def _requantised(self, dense: torch.Tensor) -> nn.Parameter:
        """A new quantised weight parameter (same quantisation settings) holding ``dense``."""
        raise NotImplementedError

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype

    @property
    def base_dtype(self) -> torch.dtype:
        # The stored weight is packed integers; peft gives adapters over quantised layers float32.
        return torch.float32

    def _restore(self, saved: dict[str, Any]) -> None:
        self.get_base_layer().weight = saved["weight"]

    def _snapshot(self) -> dict[str, Any]:
        return {"weight": self.get_base_layer().weight}

    # --- shared ----------------------------------------------------------------------------------------------
    def _logical_base_weight(self) -> torch.Tensor:
        raise TypeError(
            f"{self.layer_name}: the base weight of a {type(self.get_base_layer()).__name__} is quantised; use "
            "dequantized_weight()"
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        empty = torch.empty(0, dtype=torch.int64, device=self.weight_device)
        return self._dequantizer()(empty, empty.float(), dtype)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._dispatch_forward(x, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        input_dtype = x.dtype
        compute_dtype = self._compute_dtype(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(compute_dtype)
        if active:
            indices, values = _sorted_delta(*self._delta(active))
        else:  # the base alone (see Linear4bit._base_forward)
            indices = torch.zeros(0, dtype=torch.int64, device=x.device)
            values = torch.zeros(0, dtype=torch.float32, device=x.device)
        bias = base.bias
        probe = self.salience_probe if active else None
        out = sparse_linear(
            x,
            base.weight,
            bias,
            indices,
            values,
            False,
            None if probe is None else probe.accumulate,
            None if probe is None else probe.weight_offset,
            dequantize=self._dequantizer(),
        )
        return self._add_low_rank_output(out, x, active).to(input_dtype)

    def _merged_dense(self, names: list[str]) -> torch.Tensor:
        """The fp32 dense weight with the ``names`` adapters' deltas added (what a merge re-quantises)."""
        indices, values = _sorted_delta(*self._delta(names))
        dense = self._dequantizer()(indices, values.detach(), torch.float32)
        for name in names:
            low_rank = self.low_rank_delta(name)
            if low_rank is not None:
                dense += low_rank.to(dense.device)
        return dense

    def merged_weight_is_finite(self, adapter_names: list[str] | None = None) -> bool:
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.sparse_values]
        if not names:
            return True
        with torch.no_grad():
            return bool(torch.isfinite(self._merged_dense(names)).all())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the given (default: active) adapters into the quantised weight: dequantise, add, re-quantise.

        All given adapters are merged in one re-quantisation. The original quantised weight is kept until
        :meth:`unmerge`, which restores it bit for bit.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        names = [name for name in adapter_names if name in self.sparse_values]
        if not names:
            return
        _warn_requantisation_once()
        with torch.no_grad():
            dense = self._merged_dense(names)
            if safe_merge and not torch.isfinite(dense).all():
                raise ValueError(f"NaNs or infs detected in the merged weights; adapters {names!r} seem broken")
            snapshot = self._snapshot()
            requantised = self._requantised(dense)
        del dense
        if not self._premerge:
            self._premerge = snapshot
        self.get_base_layer().weight = requantised
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Put back the quantised weight from before the first merge (exact: the original bytes)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._restore(self._premerge)
        self._premerge = {}
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()


class Linear4bit(_QuantisedSparseLayer):
    """Sparse adapter over ``bitsandbytes.nn.Linear4bit``."""

    def _quant_state(self):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        base = self.get_base_layer()
        weight = base.weight
        state = getattr(weight, "quant_state", None)
        if state is None:
            # FSDP replaced the Params4bit by a plain tensor (unsharded, in forward) or a DTensor (sharded) over the
            # same packed storage; bitsandbytes keeps the state on the module for this case. Read it there, without
            # re-wrapping the weight as bitsandbytes' own forward does: FSDP owns that parameter.
            state = getattr(base, "quant_state", None)
            if state is None:
                raise ValueError(
                    f"{self.layer_name}: the 4-bit base weight ({type(weight).__name__}) carries no quantisation state "
                    "and neither does its module; it was not quantised by bitsandbytes"
                )
            return state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks the weight for its AVX512-BF16 CPU inference kernel after an eval-mode forward;
            # undo that (as its own state_dict saving does) so the standard layout is what we read.
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            base.quant_state = state = weight.quant_state
        return state

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base alone through our own decode, not bitsandbytes' forward.

        Two reasons. bitsandbytes' CPU forward is not the same on every CPU: on AVX512-BF16 machines its eval-mode
        forward repacks the weight in place for a bf16 kernel (which ``_quant_state`` can only undo lossily: the
        base weight moved by up to 0.5 % of a block's absmax) and it mis-decodes or fails when ``in_features`` is
        not a multiple of the blocksize. And with one decode for both paths, a disabled adapter gives exactly what
        the adapted path gives with a zero delta (a DPO-style reference model compares the two).
        """
        return self._adapted_forward(x, [], *args, **kwargs)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        # bitsandbytes' own rule: the layer's compute dtype when set, else the input's.
        compute_dtype = self.get_base_layer().compute_dtype
        return compute_dtype if compute_dtype is not None else x.dtype

    def _dequantizer(self):
        state = self._quant_state()
        packed = whole(self.get_base_layer().weight.data)  # all of it, also where FSDP2 shards it

        def dequantize(indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            return dequant_scatter_4bit(packed, state, indices, values, dtype)

        return dequantize

    def _requantised(self, dense: torch.Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        weight = base.weight
        state = self._quant_state()
        # Quantise from the dtype the original was quantised from, so the new state dequantises to the same dtype.
        new_weight = bnb.nn.Params4bit(
            dense.to(state.dtype),
            requires_grad=False,
            blocksize=weight.blocksize,
            compress_statistics=weight.compress_statistics,
            quant_type=weight.quant_type,
            quant_storage=weight.quant_storage,
            module=base,
        )
        return new_weight._quantize(dense.device)

    def _restore(self, saved: dict[str, Any]) -> None:
        base = self.get_base_layer()
        base.weight = saved["weight"]
        base.quant_state = saved["weight"].quant_state


class Linear8bitLt(_QuantisedSparseLayer):
    """Sparse adapter over ``bitsandbytes.nn.Linear8bitLt`` with int8 weights (``has_fp16_weights=False``)."""

    def _int8_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.get_base_layer()
        weight = base.weight
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else base.state.SCB
        if scales is None:
            raise RuntimeError(f"{self.layer_name}: the int8 weight has no row scales (SCB); was it quantised?")
        return weight.data, scales

    def _dequantizer(self):
        import bitsandbytes.functional as bnb_functional

        codes, scales = self._int8_weight()

        def dequantize(indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            dense = bnb_functional.int8_vectorwise_dequant(codes, scales)
            return scatter_add(dense.to(dtype), indices, values)

        return dequantize

    def _snapshot(self) -> dict[str, Any]:
        codes, scales = self._int8_weight()
        return {"weight": self.get_base_layer().weight, "codes": codes, "scales": scales}

    def _requantised(self, dense: torch.Tensor) -> nn.Parameter:
        import bitsandbytes as bnb

        base = self.get_base_layer()
        # The quantisation that Int8Params.to(device) applies, done here so the device does not matter.
        codes, scales, _ = bnb.functional.int8_vectorwise_quant(dense.to(torch.float16))
        base.state.reset_grads()
        base.state.CB, base.state.SCB = None, None
        return bnb.nn.Int8Params(codes, requires_grad=False, has_fp16_weights=False, CB=codes, SCB=scales)

    def _restore(self, saved: dict[str, Any]) -> None:
        base = self.get_base_layer()
        weight = saved["weight"]
        # Linear8bitLt moves CB/SCB from the weight into its state on first use; give both back to the weight so
        # its next forward re-initialises the state from the original bytes.
        weight.CB, weight.SCB = saved["codes"], saved["scales"]
        base.state.reset_grads()
        base.state.CB, base.state.SCB = None, None
        base.weight = weight


# The bitsandbytes layers supported (see _bnb_types) and their weights' types, by name: a weight of one of these
# types, on any layer, is quantised (the tuner refuses quantised layers it does not support, naming them).
QUANTISED_WEIGHT_TYPES = ("Params4bit", "Int8Params")  # Linear4bit's, Linear8bitLt's


def _bnb_types() -> tuple[type, type] | None:
    # A bitsandbytes layer exists only once bitsandbytes is imported: a model without one never imports it here.
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    return bnb.nn.Linear4bit, bnb.nn.Linear8bitLt


def dispatch_bnb(target: nn.Module, adapter_name: str, config: SparseConfig, layer_name: str) -> nn.Module | None:
    """A sparse layer for a supported bitsandbytes layer, else ``None``.

    Raises:
        TypeError: an 8-bit layer that keeps fp16 weights (``has_fp16_weights=True``) is not quantised at rest and
            is not supported.
    """
    types = _bnb_types()
    if types is None:
        return None
    linear4bit, linear8bit = types
    base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base_layer, linear4bit):
        return Linear4bit(target, adapter_name, config, layer_name=layer_name)
    if isinstance(base_layer, linear8bit):
        if base_layer.state.has_fp16_weights:
            raise TypeError(
                f"Target module {layer_name!r} is a bitsandbytes Linear8bitLt with "
                "has_fp16_weights=True, which peft-sparse does not support; load the model with int8 weights "
                "(BitsAndBytesConfig(load_in_8bit=True))"
            )
        return Linear8bitLt(target, adapter_name, config, layer_name=layer_name)
    return None
