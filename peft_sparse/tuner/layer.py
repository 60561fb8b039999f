"""Sparse adapter layers: a frozen base weight plus, per adapter, ``k`` trainable entries at fixed positions.

Per adapter a layer holds

* ``sparse_indices[name]``: a persistent integer buffer of row-major flat positions into the logical ``(out, in)``
  weight (sorted, unique, int32 where ``out * in < 2**31``), and
* ``sparse_values[name]``: a trainable ``Parameter`` of the same length in the adapter's delta dtype, and
* ``sparse_shape[name]``: a persistent ``int64`` buffer ``[out, in]``, the logical shape the indices address. It is
  saved with the adapter, so loading onto a layer of another shape is refused instead of scattering the entries
  onto other weights.
* with ``SparseConfig(r > 0)`` (the sparse + low-rank hybrid, RoSA), also ``sparse_lora_A[name]`` (``r x in``) and
  ``sparse_lora_B[name]`` (``out x r``, zero at initialisation): the layer's delta is then
  ``scatter(indices, values) + (lora_alpha / r) * B @ A``, trained, merged, saved and loaded together.

The forward pass goes through :func:`peft_sparse.ops.sparse_linear`, whose backward never materialises the dense
weight gradient.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .._distributed import whole
from ..ops import scatter_add, sparse_linear
from .config import SparseConfig
from .indices import check_indices, index_dtype, layer_seed, random_indices

_hooks_warned = False


def _warn_once_if_base_hooks_are_bypassed(layer) -> None:
    """The adapted forward reads the base layer's weight and calls no base-layer ``forward``, so hooks registered on
    the base layer (e.g. accelerate's CPU/disk offload) do not run: say so once per process, as peft's SHiRA does."""
    global _hooks_warned
    if _hooks_warned:
        return
    base = layer.get_base_layer()
    if base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks:
        _hooks_warned = True
        warnings.warn(
            f"the base layer of the sparse layer {layer.layer_name!r} (and perhaps others) has forward/backward "
            "(pre-)hooks, e.g. from accelerate's offloading; the sparse adapter's forward reads the base weight "
            "directly and does not run them. Register such hooks on the adapted layer instead (apply them after "
            "get_peft_model), or keep the adapted layers on one device without offloading.",
            UserWarning,
            stacklevel=3,
        )


class SparseLayer(BaseTunerLayer):
    """Mixin with the adapter state and the adapter bookkeeping shared by every sparse layer type."""

    adapter_layer_names = ("sparse_values", "sparse_lora_A", "sparse_lora_B")
    other_param_names = ("sparse_indices", "sparse_residual_indices", "sparse_residual_values", "sparse_shape")

    def __init__(self, base_layer: nn.Module, layer_name: str = "", fan_in_fan_out: bool = False, **kwargs) -> None:
        self.base_layer = base_layer
        self.sparse_values = nn.ParameterDict({})
        self.sparse_indices = BufferDict({}, persistent=True)
        # Deltas of entries that a dynamic mask update moved out of the trainable set: still part of the adapter's
        # function (forward, merge, save), no longer trained. Sorted unique positions, fp32 values; empty unless
        # update="dynamic".
        self.sparse_residual_indices = BufferDict({}, persistent=True)
        self.sparse_residual_values = BufferDict({}, persistent=True)
        self.sparse_shape = BufferDict({}, persistent=True)
        # The low-rank term of a hybrid adapter (SparseConfig.r > 0); adapters with r = 0 have no entry here.
        self.sparse_lora_A = nn.ParameterDict({})
        self.sparse_lora_B = nn.ParameterDict({})
        self.lora_scaling: dict[str, float] = {}
        # Per adapter, the dtype its values live in: SparseConfig.delta_dtype where the config pins one, else decided
        # by peft's autocast_adapter_dtype rule (SparseModel._cast_adapter_dtype). Loading never changes it.
        self.values_dtype: dict[str, torch.dtype] = {}
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
        # An adapter with no entries in this layer (k = 0, a legitimate outcome of a global budget) keeps its empty
        # values parameter frozen: DDP (without find_unused_parameters), FSDP2 (whose reduce-scatter cannot chunk an
        # empty gradient), torch.distributed.checkpoint (which wants optimizer state for every parameter that
        # requires grad) and optimizers then all leave it alone. Here, per adapter: whether it is to require grad
        # once it has entries again (what peft's set_adapter / set_requires_grad asked for while it was empty).
        self._trainable_once_sized: dict[str, bool] = {}

    @property
    def num_weight_entries(self) -> int:
        """Number of entries of the logical ``(out, in)`` weight (the size of the index space)."""
        return self.out_features * self.in_features

    def update_layer(self, adapter_name: str, config: SparseConfig, inference_mode: bool = False) -> None:
        """Create ``config``'s adapter ``adapter_name`` empty (``k = 0``); :meth:`set_sparse_entries` or
        :meth:`reset_random` sizes it.

        The model sizes every layer's adapter only once it knows all targeted layers, because a global budget is
        split across them. With ``config.delta_dtype`` unset the values are float32; ``SparseModel._cast_adapter_dtype``
        casts them to the base layer's dtype where peft is asked not to autocast (``autocast_adapter_dtype=False``).

        ``config.r > 0`` adds the low-rank term: ``A`` is drawn as LoRA draws it (Kaiming-uniform, seeded from
        ``config.seed`` and the layer's name), ``B`` is zero with ``config.init_weights`` (the adapter stays the
        identity), else seeded draws.
        """
        if adapter_name in self.sparse_values:
            raise ValueError(f"adapter_name {adapter_name!r} already exists in layer {self.layer_name!r}")
        device = self.weight_device
        delta_dtype = config.torch_delta_dtype
        values_dtype = delta_dtype if delta_dtype is not None else torch.float32
        self.values_dtype[adapter_name] = values_dtype
        self.sparse_indices[adapter_name] = torch.empty(0, dtype=index_dtype(self.num_weight_entries), device=device)
        self.sparse_values[adapter_name] = nn.Parameter(torch.empty(0, dtype=values_dtype, device=device))
        self.sparse_residual_indices[adapter_name] = torch.empty(0, dtype=torch.int64, device=device)
        self.sparse_residual_values[adapter_name] = torch.empty(0, dtype=torch.float32, device=device)
        self.sparse_shape[adapter_name] = torch.tensor(self.logical_shape, dtype=torch.int64, device=device)
        if config.r > 0:
            self._add_low_rank(adapter_name, config, values_dtype, device)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def _add_low_rank(self, adapter_name: str, config: SparseConfig, dtype: torch.dtype, device: torch.device) -> None:
        """``A`` and ``B`` as LoRA draws them, stored divided by ``config.low_rank_lr_ratio`` (``c``) with the scale
        ``lora_alpha / r * c**2``: the same term, whose factors an Adam-type optimizer moves ``c`` times as far."""
        r, ratio = config.r, float(config.low_rank_lr_ratio)
        generator = torch.Generator().manual_seed(layer_seed(config.seed, self.layer_name) + 1)
        lora_a = torch.empty(r, self.in_features)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=generator)
        if config.init_weights:
            lora_b = torch.zeros(self.out_features, r)
        else:
            lora_b = torch.randn(self.out_features, r, generator=generator) / r
        self.sparse_lora_A[adapter_name] = nn.Parameter((lora_a / ratio).to(device=device, dtype=dtype))
        self.sparse_lora_B[adapter_name] = nn.Parameter((lora_b / ratio).to(device=device, dtype=dtype))
        self.lora_scaling[adapter_name] = config.lora_alpha / r * ratio**2

    def low_rank_delta(self, adapter_name: str) -> torch.Tensor | None:
        """The adapter's low-rank term ``scaling * B @ A`` as a dense float32 ``(out, in)`` tensor, or ``None``
        when the adapter has none (``r = 0``)."""
        if adapter_name not in self.sparse_lora_A:
            return None
        lora_a = whole(self.sparse_lora_A[adapter_name].detach()).float()
        lora_b = whole(self.sparse_lora_B[adapter_name].detach()).float()
        return (lora_b @ lora_a) * self.lora_scaling[adapter_name]

    def _add_low_rank_output(self, result: torch.Tensor, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        """``result`` plus the low-rank terms of the given adapters applied to ``x`` (computed in each term's
        dtype, as LoRA does); ``result`` itself when none of them has one."""
        for name in adapter_names:
            lora_a = self.sparse_lora_A.get(name)
            if lora_a is None:
                continue
            lora_b = self.sparse_lora_B[name]
            term = nn.functional.linear(nn.functional.linear(x.to(lora_a.dtype), lora_a), lora_b)
            result = result + (term * self.lora_scaling[name]).to(result.dtype)
        return result

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter's tensors (peft) and this layer's own records of it, so that an adapter added later
        under the same name starts clean (a fresh, never-selected mask)."""
        super().delete_adapter(adapter_name)
        self.mask_chosen.discard(adapter_name)
        self.values_dtype.pop(adapter_name, None)
        self.lora_scaling.pop(adapter_name, None)
        self._trainable_once_sized.pop(adapter_name, None)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self._freeze_empty_values(list(self.sparse_values))

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self._freeze_empty_values([adapter_names] if isinstance(adapter_names, str) else list(adapter_names))

    def _freeze_empty_values(self, adapter_names: list[str]) -> None:
        """After peft set ``requires_grad`` on these adapters: freeze those without entries here, remembering what
        peft asked for until they have entries (see ``_trainable_once_sized``)."""
        for name in adapter_names:
            values = self.sparse_values.get(name)
            if values is not None and values.numel() == 0:
                self._trainable_once_sized[name] = values.requires_grad
                values.requires_grad_(False)

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype peft gives an adapter that is not autocast: the base weight's (quantised layers: float32)."""
        return self.get_base_layer().weight.dtype

    def cast_values(self, adapter_name: str, dtype: torch.dtype) -> None:
        """Give the adapter's values (and its low-rank factors, if any) ``dtype`` from now on, keeping the
        ``Parameter`` objects (and their ``requires_grad``)."""
        self.values_dtype[adapter_name] = dtype
        for container in (self.sparse_values, self.sparse_lora_A, self.sparse_lora_B):
            parameter = container.get(adapter_name)
            if parameter is not None and parameter.dtype != dtype:
                parameter.data = parameter.data.to(dtype)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        """Move the adapter to the base layer's device; the values take the dtype decided for them.

        peft's version casts every floating tensor to the base layer's dtype; after a ``low_cpu_mem_usage`` load
        that would silently round float32 deltas to bf16/fp16 (and the fp32 residual with them). Here the values
        get the dtype the adapter was created with (``values_dtype``), whatever the file held, exactly as a regular
        load copies into the existing tensors; residuals stay float32.

        Also the one place that sees the result of a ``low_cpu_mem_usage`` load (peft calls it right after
        ``load_state_dict(assign=True)``): tensors still on the meta device were missing from the file, which is
        refused here, naming them, instead of failing later with "Cannot copy out of meta tensor".
        """
        if adapter_name not in self.sparse_values:
            return
        containers = {
            name: getattr(self, name)
            for name in self.adapter_layer_names + self.other_param_names
            if adapter_name in getattr(self, name)
        }
        missing = [
            f"{self.layer_name}.{name}.{adapter_name}"
            for name, container in containers.items()
            if container[adapter_name].device.type == "meta"
        ]
        if missing:
            raise ValueError(
                f"Cannot load sparse adapter {adapter_name!r}: the checkpoint has no tensors for {missing}; it was "
                "saved from a model without this layer, or the file is incomplete"
            )
        target = device if device is not None else self.weight_device
        for container in containers.values():
            container[adapter_name] = container[adapter_name].to(target)
        self.cast_values(adapter_name, self.values_dtype[adapter_name])
        self._freeze_empty_values([adapter_name])

    def set_sparse_entries(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None = None) -> None:
        """Replace the index set (and values) of an existing adapter, validating first.

        ``values`` defaults to zeros. The values ``Parameter`` keeps its identity and is resized in place, so an
        optimizer built before a selection trains the selected entries (it must not have stepped yet: moments of
        the old length would not fit). Code that must keep ``k`` fixed during training rewrites the existing tensors
        in place instead (see ``peft_sparse.selection``).
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
        was_empty = old_values.numel() == 0
        self.sparse_indices[adapter_name] = indices.to(device=device, dtype=index_dtype(self.num_weight_entries))
        old_values.data = values.detach().to(device=device, dtype=old_values.dtype).clone()
        if indices.numel() == 0 and not was_empty:
            self._freeze_empty_values([adapter_name])
        elif indices.numel() and was_empty:
            old_values.requires_grad_(self._trainable_once_sized.pop(adapter_name, old_values.requires_grad))

    def initial_entries(self, num_entries: int, seed: int, init_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The seeded index set and values an adapter of ``num_entries`` entries starts from in this layer.

        A function of the seed, the layer's name and ``num_entries`` only, so it can be recomputed to tell whether
        an adapter still holds its initial values. Values are zero with ``init_weights``, else draws from
        ``N(0, 1 / in_features)``: the scale of the layer's own default initialisation, so the delta is visible
        without swamping the base weight.
        """
        generator = torch.Generator().manual_seed(layer_seed(seed, self.layer_name))
        indices = random_indices(self.num_weight_entries, num_entries, generator)
        if init_weights:
            return indices, torch.zeros(num_entries, dtype=torch.float32)
        values = torch.randn(num_entries, generator=generator, dtype=torch.float32) / self.in_features**0.5
        return indices, values

    def reset_random(self, adapter_name: str, num_entries: int, seed: int, init_weights: bool = True) -> None:
        """Give ``adapter_name`` a uniformly random, seeded index set of ``num_entries`` entries, with zero values
        (``init_weights=True``) or seeded non-zero ones (see :meth:`initial_entries`)."""
        self.set_sparse_entries(adapter_name, *self.initial_entries(num_entries, seed, init_weights))

    @property
    def logical_shape(self) -> tuple[int, int]:
        """``(out_features, in_features)``: the shape of the weight the indices address."""
        return self.out_features, self.in_features

    @property
    def weight_device(self) -> torch.device:
        return self.get_base_layer().weight.device

    def _logical_base_weight(self) -> torch.Tensor:
        """The base weight's data as an ``(out, in)`` view (a transpose view for ``Conv1D``)."""
        weight = whole(self.get_base_layer().weight.data)  # all of it, also where FSDP2 shards it
        return weight.t() if self.fan_in_fan_out else weight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A new dense ``(out, in)`` copy of the frozen base weight in ``dtype`` (quantised layers dequantise)."""
        return self._logical_base_weight().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)

    def adapter_delta(self, adapter_name: str, detach: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's whole delta as one (indices, values) pair: its trainable entries plus any residual."""
        indices, values = self.sparse_indices[adapter_name], self.sparse_values[adapter_name]
        if detach:
            # Outside forward, FSDP2 holds the values sharded; inspection and merges need all of them.
            values = whole(values.detach())
        if values.numel() == 0:
            # No entries here (frozen, see _trainable_once_sized): no gradient either, not even an empty one, should
            # requires_grad have been switched on by other means (FSDP2 cannot reduce-scatter an empty gradient).
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

    def _dispatch_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The forward every sparse layer type shares: base layer alone, the active adapters, or (with
        ``adapter_names=``, injected by ``SparseModel._enable_peft_forward_hooks``) one adapter per batch row."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is not None:
            self._check_adapter_names(x, adapter_names)
            if not self.disable_adapters:
                _warn_once_if_base_hooks_are_bypassed(self)
                return self._mixed_batch_forward(x, adapter_names, *args, **kwargs)
        active = self._adapters_to_apply()
        if not active:
            return self._base_forward(x, *args, **kwargs)
        _warn_once_if_base_hooks_are_bypassed(self)
        return self._adapted_forward(x, active, *args, **kwargs)

    def _base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer alone (adapters disabled or merged, or a ``"__base__"`` row of a mixed batch)."""
        return self.base_layer(x, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer's output with the sum of the given adapters' deltas on the base weight."""
        raise NotImplementedError

    def _check_adapter_names(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        if len(adapter_names) != len(x):
            raise ValueError(
                f"Length of `adapter_names` should be the same as the number of inputs, but got {len(adapter_names)} "
                f"and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(
        self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Each batch row through its own adapter (``"__base__"``, or an adapter this layer lacks: the base layer)."""
        result = self._base_forward(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):  # unique, in order of appearance
            if name == "__base__" or name not in self.sparse_values:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=x.device)
            result[rows] = self._adapted_forward(x[rows], [name], *args, **kwargs).to(result.dtype)
        return result

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
        """The adapter's delta (sparse entries plus any low-rank term) as a dense ``(out, in)`` tensor in
        :attr:`base_dtype` (float32 over quantised layers; allocates; for inspection and merging, not for the training
        path)."""
        delta = torch.zeros(self.logical_shape, dtype=torch.float32, device=self.weight_device)
        return self._merged_delta_into(delta, adapter_name).to(self.base_dtype)

    def _merged_delta_into(self, target: torch.Tensor, adapter_name: str, sign: float = 1.0) -> torch.Tensor:
        """``target`` (in place) plus ``sign`` times the adapter's whole delta."""
        indices, values = self.adapter_delta(adapter_name, detach=True)
        scatter_add(target, indices, values if sign > 0 else -values)
        low_rank = self.low_rank_delta(adapter_name)
        if low_rank is not None:
            target += (sign * low_rank).to(device=target.device, dtype=target.dtype)
        return target

    def merged_weight_is_finite(self, adapter_names: list[str] | None = None) -> bool:
        """Whether merging the given (default: active) adapters would leave this layer's weight finite. Changes
        nothing; holds one dense copy of the layer's weight while it checks."""
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.sparse_values]
        if not names:
            return True
        with torch.no_grad():
            candidate = self._logical_base_weight().clone()
            for name in names:
                self._merged_delta_into(candidate, name)
            return bool(torch.isfinite(candidate).all())

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
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
            with torch.no_grad():
                if safe_merge:
                    candidate = self._merged_delta_into(target.clone(), name)
                    if not torch.isfinite(candidate).all():
                        raise ValueError(f"NaNs or infs detected in the merged weights; adapter {name!r} seems broken")
                    target.copy_(candidate)
                else:
                    self._merged_delta_into(target, name)
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
                self._merged_delta_into(self._logical_base_weight(), name, sign=-1.0)

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
            self._check_saved_shape(state_dict, f"{prefix}sparse_shape.{name}")
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

    def _check_saved_shape(self, state_dict, shape_key: str) -> None:
        """Refuse an adapter saved on a layer of another logical shape: its flat positions would address other
        weights (an entry at (r, c) of a 64-wide layer lands on another (row, col) of a 96-wide one)."""
        saved = state_dict.get(shape_key)
        if saved is None:
            warnings.warn(
                "Loading a sparse adapter saved without layer shapes (by an earlier peft-sparse): only the index range "
                "is checked, so an adapter saved on a model with other layer sizes may load onto the wrong weights. "
                "Save it again to record the shapes.",
                UserWarning,
                stacklevel=2,
            )
            # The load then fills the record from here, a low_cpu_mem_usage load (which assigns what the file
            # holds) included.
            state_dict[shape_key] = torch.tensor(self.logical_shape, dtype=torch.int64)
            return
        saved_shape = tuple(int(v) for v in saved.reshape(-1).tolist())
        if saved_shape != self.logical_shape:
            raise ValueError(
                f"Cannot load the sparse adapter into layer {self.layer_name!r}: it was saved on a layer of shape "
                f"(out, in) = {saved_shape}, this layer is {self.logical_shape}"
            )

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
        config: SparseConfig,
        layer_name: str = "",
        fan_in_fan_out: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        SparseLayer.__init__(self, base_layer, layer_name=layer_name, fan_in_fan_out=fan_in_fan_out, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        self.register_load_state_dict_pre_hook(self._load_sparse_state_pre_hook)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._dispatch_forward(x, *args, **kwargs)

    def _adapted_forward(self, x: torch.Tensor, active: list[str], *args: Any, **kwargs: Any) -> torch.Tensor:
        base = self.get_base_layer()
        indices, values = self._delta(active)
        if not torch.is_autocast_enabled(x.device.type):
            x = self._cast_input_dtype(x, base.weight.dtype)
        probe = self.salience_probe
        if probe is None:
            result = sparse_linear(x, base.weight, base.bias, indices, values, self.fan_in_fan_out)
        else:
            result = sparse_linear(
                x, base.weight, base.bias, indices, values, self.fan_in_fan_out, probe.accumulate, probe.weight_offset
            )
        return self._add_low_rank_output(result, x, active)

    def __repr__(self) -> str:
        return "sparse." + super().__repr__()
