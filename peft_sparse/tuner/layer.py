"""Sparse adapter layers: a frozen base weight plus, per adapter, ``k`` trainable entries at fixed positions.

Per adapter a layer holds

* ``sparse_indices[name]``: a persistent integer buffer of row-major flat positions into the logical ``(out, in)``
  weight (sorted, unique, int32 where ``out * in < 2**31``), and
* ``sparse_values[name]``: a trainable ``Parameter`` of the same length in the adapter's ``delta_dtype``.

The forward pass goes through :func:`peft_sparse.ops.sparse_linear`, whose backward never materialises the dense
weight gradient.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..ops import scatter_add, sparse_linear
from .indices import check_indices, index_dtype, layer_seed, random_indices


class SparseLayer(BaseTunerLayer):
    """Mixin with the adapter state and the adapter bookkeeping shared by every sparse layer type."""

    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices", "sparse_residual_indices", "sparse_residual_values")

    def __init__(self, base_layer: nn.Module, layer_name: str = "", fan_in_fan_out: bool = False, **kwargs) -> None:
        self.base_layer = base_layer
        self.sparse_values = nn.ParameterDict({})
        self.sparse_indices = BufferDict({}, persistent=True)
        # Deltas of entries that a dynamic mask update moved out of the trainable set: still part of the adapter's
        # function (forward, merge, save), no longer trained. Sorted unique positions, fp32 values; empty unless
        # update="dynamic".
        self.sparse_residual_indices = BufferDict({}, persistent=True)
        self.sparse_residual_values = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters = []
        self.fan_in_fan_out = fan_in_fan_out
        # The module's name in the model seeds its random index sets, so a layer's initial mask does not depend on
        # the order in which layers are created.
        self.layer_name = layer_name
        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            # Read from the module, not the weight: a quantised weight's tensor has its packed storage shape.
            self.out_features, self.in_features = base.out_features, base.in_features
        elif fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.out_features, self.in_features = base.weight.shape
        self.kwargs = kwargs
        # Set only while peft_sparse.select_mask estimates salience (see selection/salience.py).
        self.salience_probe = None
        # Adapters whose index set was chosen deliberately (by select_mask / update_mask, or loaded from a saved
        # adapter) rather than being the seeded random placeholder; SparseTrainingCallback selects only otherwise.
        self.mask_chosen: set[str] = set()

    @property
    def num_weight_entries(self) -> int:
        """Number of entries of the logical ``(out, in)`` weight (the size of the index space)."""
        return self.out_features * self.in_features

    def update_layer(self, adapter_name: str, delta_dtype: torch.dtype, inference_mode: bool = False) -> None:
        """Create an empty (``k = 0``) adapter; :meth:`set_sparse_entries` or :meth:`reset_random` sizes it.

        The model sizes every layer's adapter only once it knows all targeted layers, because a global budget is
        split across them.
        """
        if adapter_name in self.sparse_values:
            raise ValueError(f"adapter_name {adapter_name!r} already exists in layer {self.layer_name!r}")
        device = self.get_base_layer().weight.device
        self.sparse_indices[adapter_name] = torch.empty(0, dtype=index_dtype(self.num_weight_entries), device=device)
        self.sparse_values[adapter_name] = nn.Parameter(torch.empty(0, dtype=delta_dtype, device=device))
        self.sparse_residual_indices[adapter_name] = torch.empty(0, dtype=torch.int64, device=device)
        self.sparse_residual_values[adapter_name] = torch.empty(0, dtype=torch.float32, device=device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_sparse_entries(
        self, adapter_name: str, indices: torch.Tensor, values: Optional[torch.Tensor] = None
    ) -> None:
        """Replace the index set (and values) of an existing adapter, validating first.

        ``values`` defaults to zeros. The values ``Parameter`` is replaced by a new one of the new length, so call
        this before building the optimizer; code that must keep ``k`` fixed during training rewrites the existing
        tensors in place instead.
        """
        if adapter_name not in self.sparse_values:
            raise ValueError(f"adapter_name {adapter_name!r} does not exist in layer {self.layer_name!r}")
        where = f"{self.layer_name}.sparse_indices.{adapter_name}"
        check_indices(indices, self.num_weight_entries, where)
        old_values = self.sparse_values[adapter_name]
        if values is None:
            values = torch.zeros(indices.numel(), dtype=old_values.dtype)
        elif values.shape != indices.shape:
            raise ValueError(
                f"{self.layer_name}.sparse_values.{adapter_name}: expected shape {tuple(indices.shape)} to match the "
                f"indices, got {tuple(values.shape)}"
            )
        device = old_values.device
        self.sparse_indices[adapter_name] = indices.to(device=device, dtype=index_dtype(self.num_weight_entries))
        self.sparse_values[adapter_name] = nn.Parameter(
            values.detach().to(device=device, dtype=old_values.dtype), requires_grad=old_values.requires_grad
        )

    def reset_random(self, adapter_name: str, num_entries: int, seed: int) -> None:
        """Give ``adapter_name`` a uniformly random, seeded index set of ``num_entries`` entries with zero values."""
        generator = torch.Generator().manual_seed(layer_seed(seed, self.layer_name))
        self.set_sparse_entries(adapter_name, random_indices(self.num_weight_entries, num_entries, generator))

    @property
    def logical_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``: the shape of the weight the indices address."""
        return self.out_features, self.in_features

    @property
    def weight_device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def _logical_base_weight(self) -> torch.Tensor:
        """The base weight's data as an ``(out, in)`` view (a transpose view for ``Conv1D``)."""
        weight = self.get_base_layer().weight.data
        return weight.t() if self.fan_in_fan_out else weight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A new dense ``(out, in)`` copy of the frozen base weight in ``dtype`` (quantised layers dequantise)."""
        return self._logical_base_weight().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)

    def adapter_delta(self, adapter_name: str, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's whole delta as one (indices, values) pair: its trainable entries plus any residual."""
        indices, values = self.sparse_indices[adapter_name], self.sparse_values[adapter_name]
        if detach:
            values = values.detach()
        residual = self.sparse_residual_indices[adapter_name]
        if residual.numel() == 0:
            return indices, values
        # Residual positions are never trainable positions (see peft_sparse.selection.update_mask), so the
        # concatenation is the exact sum and the values' gradient is unaffected.
        return (
            torch.cat([indices.to(torch.int64), residual.to(indices.device)]),
            torch.cat([values.float(), self.sparse_residual_values[adapter_name].to(values.device)]),
        )

    def _delta(self, adapter_names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices and values of the sum of the given adapters' deltas, as one (possibly unsorted) pair."""
        if len(adapter_names) == 1:
            return self.adapter_delta(adapter_names[0])
        # Overlapping positions simply accumulate in the scatter, so concatenation is the exact sum.
        pairs = [self.adapter_delta(name) for name in adapter_names]
        return torch.cat([i.to(torch.int64) for i, _ in pairs]), torch.cat([v.float() for _, v in pairs])

    def _adapters_to_apply(self) -> list[str]:
        """The active adapters a forward must add on top of the base layer; empty when the base layer alone gives
        the output (adapters disabled, which first unmerges any merged ones, or already merged)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        if self.merged:
            return []
        return [name for name in self.active_adapters if name in self.sparse_values]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The adapter's delta as a dense ``(out, in)`` tensor in the base weight's dtype (allocates; for inspection
        and merging, not for the training path)."""
        base = self._logical_base_weight()
        delta = torch.zeros(base.shape, dtype=base.dtype, device=base.device)
        return scatter_add(delta, *self.adapter_delta(adapter_name, detach=True))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the given (default: active) adapters' deltas into the base weight in place.

        Args:
            safe_merge: merge into a copy first and raise if the result contains NaN or inf, leaving the base weight
                untouched.
            adapter_names: adapters to merge; defaults to the active ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.sparse_values:
                continue
            target = self._logical_base_weight()
            indices, values = self.adapter_delta(name, detach=True)
            with torch.no_grad():
                if safe_merge:
                    candidate = scatter_add(target.clone(), indices, values)
                    if not torch.isfinite(candidate).all():
                        raise ValueError(f"NaNs or infs detected in the merged weights; adapter {name!r} seems broken")
                    target.copy_(candidate)
                else:
                    scatter_add(target, indices, values)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract every merged adapter's delta from the base weight again (exact up to the weight's rounding)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.sparse_values:
                continue
            with torch.no_grad():
                indices, values = self.adapter_delta(name, detach=True)
                scatter_add(self._logical_base_weight(), indices, -values)

    def _load_sparse_state_pre_hook(self, module, state_dict, prefix, local_metadata, strict, *args) -> None:
        """Validate an incoming adapter and resize this layer's tensors to it before ``load_state_dict`` copies.

        A saved adapter's per-layer ``k`` may differ from the freshly allocated one (a global budget gives each
        layer the share its salience earned), so the layer adopts the checkpoint's sizes; but only after checking
        that the checkpoint is a valid sparse adapter for this layer, so a corrupt or mismatched file raises instead
        of loading garbage.
        """
        for name in list(self.sparse_values.keys()):
            indices_key = f"{prefix}sparse_indices.{name}"
            values_key = f"{prefix}sparse_values.{name}"
            has_indices, has_values = indices_key in state_dict, values_key in state_dict
            if not (has_indices or has_values):
                continue
            if has_indices != has_values:
                present, absent = (indices_key, values_key) if has_indices else (values_key, indices_key)
                raise ValueError(f"Corrupt sparse adapter: found {present!r} but not {absent!r}")
            indices, values = state_dict[indices_key], state_dict[values_key]
            check_indices(indices, self.num_weight_entries, indices_key)
            if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() != 1:
                raise ValueError(f"{values_key}: values must be a 1-D floating tensor, got {_describe(values)}")
            if values.shape != indices.shape:
                raise ValueError(
                    f"{values_key}: {values.numel()} values do not match the {indices.numel()} indices of "
                    f"{indices_key}"
                )
            if indices.shape != self.sparse_indices[name].shape:
                self.set_sparse_entries(name, indices)
            self._adopt_residual(name, state_dict, prefix)
            self.mask_chosen.add(name)

    def _adopt_residual(self, name: str, state_dict, prefix: str) -> None:
        indices_key = f"{prefix}sparse_residual_indices.{name}"
        values_key = f"{prefix}sparse_residual_values.{name}"
        if indices_key not in state_dict and values_key not in state_dict:
            return  # an adapter saved without residual (static mask, or an older version)
        if (indices_key in state_dict) != (values_key in state_dict):
            raise ValueError(f"Corrupt sparse adapter: {indices_key!r} and {values_key!r} must come together")
        indices, values = state_dict[indices_key], state_dict[values_key]
        check_indices(indices, self.num_weight_entries, indices_key)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.shape != indices.shape:
            raise ValueError(f"{values_key}: expected {indices.numel()} floating values, got {_describe(values)}")
        device = self.sparse_values[name].device
        self.sparse_residual_indices[name] = torch.empty(indices.shape, dtype=torch.int64, device=device)
        self.sparse_residual_values[name] = torch.empty(values.shape, dtype=torch.float32, device=device)



def _describe(tensor: Any) -> str:
    if isinstance(tensor, torch.Tensor):
        return f"dtype {tensor.dtype}, shape {tuple(tensor.shape)}"
    return type(tensor).__name__


class Linear(nn.Module, SparseLayer):
    """Sparse adapter over a ``torch.nn.Linear`` or a GPT-2 ``Conv1D`` (with ``fan_in_fan_out=True``)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        delta_dtype: torch.dtype = torch.float32,
        layer_name: str = "",
        fan_in_fan_out: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        SparseLayer.__init__(self, base_layer, layer_name=layer_name, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, delta_dtype)
        self.register_load_state_dict_pre_hook(self._load_sparse_state_pre_hook)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = self._adapters_to_apply()
        if not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        indices, values = self._delta(active)
        if not torch.is_autocast_enabled(x.device.type):
            x = self._cast_input_dtype(x, base.weight.dtype)
        probe = self.salience_probe
        if probe is None:
            return sparse_linear(x, base.weight, base.bias, indices, values, self.fan_in_fan_out)
        return sparse_linear(
            x, base.weight, base.bias, indices, values, self.fan_in_fan_out, probe.accumulate, probe.weight_offset
        )

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()
