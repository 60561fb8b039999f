"""`SparseModel`: the peft tuner that injects sparse adapter layers into a model."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper, _get_submodules
from torch import nn
from transformers.pytorch_utils import Conv1D

from .bnb import QUANTISED_WEIGHT_TYPES, dispatch_bnb
from .budget import allocate_budget
from .config import SparseConfig
from .layer import Linear, SparseLayer
from .lookup import sparse_layers
from .registration import PREFIX


def _unsupported_reason(layer_name: str, base_layer: nn.Module) -> str | None:
    """Why ``base_layer`` cannot carry a sparse adapter yet, or ``None`` if it can."""
    weight = getattr(base_layer, "weight", None)
    quantised = weight is not None and (
        type(weight).__name__ in QUANTISED_WEIGHT_TYPES or not weight.is_floating_point()
    )
    if isinstance(base_layer, (nn.Linear, Conv1D)) and not quantised:
        return None
    kind = "quantised layer" if quantised else "layer"
    return (
        f"Target module {layer_name!r} is a {kind} of type {type(base_layer).__module__}.{type(base_layer).__name__}, "
        "which peft-sparse does not support; supported types are torch.nn.Linear, transformers Conv1D, "
        "bitsandbytes Linear4bit and bitsandbytes Linear8bitLt (int8 weights)"
    )


def _warn_about_stray_adapter_tensors(module: nn.Module, incompatible_keys) -> None:
    """After a load: sparse tensors the model has no place for (peft loads adapters with ``strict=False`` and drops
    them without a word, for every tuner). They come from modules the config does not target, e.g. an
    ``adapter_config.json`` whose ``target_modules`` lists fewer modules than the adapter file holds."""
    stray = [key for key in incompatible_keys.unexpected_keys if f".{PREFIX}" in key]
    if stray:
        modules = sorted({key.split(f".{PREFIX}")[0] for key in stray})
        warnings.warn(
            f"{len(stray)} sparse adapter tensor(s) of {len(modules)} module(s) were not loaded, because the adapter's "
            f"config does not target those modules (e.g. {modules[:3]}): the adapter file and its "
            "adapter_config.json (target_modules, exclude_modules, layers_to_transform) disagree, and the model "
            "computes without those deltas",
            stacklevel=3,
        )


class SparseModel(BaseTuner):
    """Creates a sparse fine-tuning model from a pretrained transformers model.

    Every targeted ``nn.Linear`` / ``Conv1D`` is wrapped in a sparse layer holding, per adapter, ``k`` trainable
    entries of a delta on its frozen weight. Budgets are allocated over all targeted layers of an adapter at once
    (see :func:`peft_sparse.tuner.budget.allocate_budget`), so the trainable-parameter count is exactly the one the
    config asks for.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to be adapted.
        config ([`SparseConfig`]): The configuration of the sparse adapter.
        adapter_name (`str`): The name of the adapter, defaults to `"default"`.

    Example:
        ```py
        >>> import peft_sparse
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_sparse.SparseConfig(target_modules=["q_proj", "v_proj"]))
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = SparseLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        """Inject the adapter's layers, then size every layer's index set from the adapter's budget.

        The config is validated again first (a config mutated after construction, ``config.density = 5.0``, is
        refused here rather than half-applied). If anything fails, every layer injected for this adapter is removed
        again before the error propagates, so the model is never left half-adapted.
        """
        config = self.peft_config[adapter_name]
        if isinstance(config, SparseConfig):
            config.validate()
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            if not self._entries_given:
                self._allocate_budget(model, adapter_name)
        except Exception:
            self._remove_adapter_layers(model, adapter_name)
            raise
        if not hasattr(self, "_stray_tensors_hook"):
            self._stray_tensors_hook = self.register_load_state_dict_post_hook(_warn_about_stray_adapter_tensors)

    # Set while add_weighted_adapter injects a layer set whose entries it writes itself.
    _entries_given = False

    def _allocate_budget(self, model: nn.Module, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        layers = self._layers_with_adapter(model, adapter_name)
        sizes = [layer.num_weight_entries for layer in layers]
        counts = allocate_budget(sizes, config.density, config.num_tunable_weights, config.budget)
        if sum(counts) == 0:
            raise ValueError(
                f"SparseConfig.density={config.density!r} gives 0 trainable entries over the {sum(sizes)} weights of "
                f"the {len(layers)} targeted layers (budget={config.budget!r}); raise the density or set "
                "num_tunable_weights"
            )
        for layer, count in zip(layers, counts):
            layer.reset_random(adapter_name, count, config.seed, config.init_weights)

    @staticmethod
    def _layers_with_adapter(model: nn.Module, adapter_name: str) -> list[SparseLayer]:
        return [layer for _, layer in sparse_layers(model, adapter_name)]

    @staticmethod
    def _remove_adapter_layers(model: nn.Module, adapter_name: str) -> None:
        """Undo an injection: drop the adapter from shared layers, unwrap layers that only held this adapter."""
        for name, module in sparse_layers(model, adapter_name):
            if len(module.sparse_values) > 1:
                module.delete_adapter(adapter_name)
                continue
            parent, _, target_name = _get_submodules(model, name)
            setattr(parent, target_name, module.get_base_layer())

    def _create_and_replace(
        self, sparse_config: SparseConfig, adapter_name, target, target_name, parent, current_key, **optional_kwargs
    ) -> None:
        if current_key is None:
            raise ValueError("current_key must not be None")
        if isinstance(target, SparseLayer):
            target.update_layer(adapter_name, sparse_config, inference_mode=sparse_config.inference_mode)
            return
        new_module = self._create_new_module(sparse_config, adapter_name, target, current_key)
        if adapter_name not in self.active_adapters:
            # an additional adapter is not trainable until it is activated
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(sparse_config: SparseConfig, adapter_name: str, target: nn.Module, layer_name: str):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        quantised = dispatch_bnb(target, adapter_name, sparse_config, layer_name)
        if quantised is not None:
            return quantised
        reason = _unsupported_reason(layer_name, base_layer)
        if reason is not None:
            raise TypeError(reason)
        # The layout is a property of the layer type, so it is taken from the layer rather than trusted from the
        # config; a config that disagrees is corrected with a warning, as LoRA does.
        fan_in_fan_out = isinstance(base_layer, Conv1D)
        if sparse_config.fan_in_fan_out != fan_in_fan_out:
            kind = "transformers' Conv1D, whose weight is stored (in, out)" if fan_in_fan_out else "torch.nn.Linear"
            warnings.warn(
                f"SparseConfig.fan_in_fan_out is {sparse_config.fan_in_fan_out} but the target module {layer_name!r} "
                f"is {kind}; setting fan_in_fan_out to {fan_in_fan_out}",
                UserWarning,
                stacklevel=2,
            )
            sparse_config.fan_in_fan_out = fan_in_fan_out
        return Linear(target, adapter_name, sparse_config, layer_name=layer_name, fan_in_fan_out=fan_in_fan_out)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """peft's dtype rule for the values, unless ``SparseConfig.delta_dtype`` pins them.

        With ``delta_dtype=None`` the values are float32 (what ``autocast_adapter_dtype=True``, peft's default,
        gives every tuner); ``autocast_adapter_dtype=False`` puts them in the base layer's dtype. A pinned
        ``delta_dtype`` is kept either way. The residual of dynamic updates stays float32. (peft < 0.19 does not
        call this from ``add_adapter``: added adapters then keep float32.)
        """
        config = self.peft_config[adapter_name]
        if isinstance(config, SparseConfig) and config.delta_dtype is not None:
            return
        for layer in self._layers_with_adapter(self.model, adapter_name):
            layer.cast_values(adapter_name, torch.float32 if autocast_adapter_dtype else layer.base_dtype)

    def _refuse_a_non_finite_merge(self, adapter_names: list[str] | None) -> None:
        """A safe merge checks every layer before it changes any (peft's merges go layer by layer, so a NaN in the
        last layer left the others merged, or merged and unloaded)."""
        broken = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, SparseLayer) and not module.merged_weight_is_finite(adapter_names)
        ]
        if broken:
            raise ValueError(
                f"NaNs or infs detected in the merged weights of {len(broken)} layer(s) (e.g. {broken[:3]}); the "
                "adapter seems broken. Nothing was merged."
            )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_merge_allowed()
            self._refuse_a_non_finite_merge(adapter_names)
        # Every layer was checked above: merging into a second copy per layer would only repeat that work.
        super().merge_adapter(adapter_names, safe_merge=False)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge and safe_merge:
            self._check_merge_allowed()
            self._refuse_a_non_finite_merge(adapter_names)
        # As in merge_adapter: the check above covered every layer.
        return super()._unload_and_optionally_merge(merge, progressbar, False, adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter; refused while it is merged (its delta would stay in the base weights with nothing
        left to unmerge it), on every peft version."""
        if any(adapter_name in layer.merged_adapters for layer in self._layers_with_adapter(self.model, adapter_name)):
            # peft >= 0.19's own wording, so callers see one message whatever the peft version
            raise ValueError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        super().delete_adapter(adapter_name)

    @contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs) -> Iterator[None]:
        """Mixed adapter batches: ``model(..., adapter_names=[...])`` runs row ``i`` through adapter
        ``adapter_names[i]`` (``"__base__"``: no adapter), as LoRA does. Inference only."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise ValueError("Cannot pass `adapter_names` when the model is in training mode.")
        if not isinstance(adapter_names, (list, tuple)) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"`adapter_names` must be a list of str, got {adapter_names!r}")
        known = {name for _, module in sparse_layers(self.model) for name in module.sparse_values}
        unknown = {name for name in adapter_names if name != "__base__"} - known
        if unknown:
            raise ValueError(f"Trying to infer with non-existing adapter(s): {', '.join(sorted(unknown))}")
        handles = []
        hook = functools.partial(_inject_adapter_names, adapter_names=list(adapter_names))
        try:
            for module in self.model.modules():
                if isinstance(module, (SparseLayer, AuxiliaryTrainingWrapper)):
                    handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add a new adapter that is the weighted sum of existing sparse adapters.

        In every layer the new adapter's index set is the union of the given adapters' index sets, and its values
        are ``sum_a weight_a * values_a`` at each position (an adapter that lacks a position contributes zero). The
        new adapter is not activated; use ``set_adapter``.

        Args:
            adapters: names of existing sparse adapters.
            weights: one weight per adapter.
            adapter_name: name of the new adapter.
        """
        adapters = list(adapters)
        weights = [float(w) for w in weights]
        if not adapters:
            raise ValueError("add_weighted_adapter: adapters must not be empty")
        if len(weights) != len(adapters):
            raise ValueError(
                f"add_weighted_adapter: got {len(weights)} weights for {len(adapters)} adapters {adapters!r}"
            )
        missing = [name for name in adapters if name not in self.peft_config]
        if missing:
            raise ValueError(f"add_weighted_adapter: adapters {missing!r} do not exist")
        if adapter_name in self.peft_config:
            raise ValueError(f"add_weighted_adapter: adapter_name {adapter_name!r} already exists")
        configs = [self.peft_config[name] for name in adapters]
        if any(not isinstance(c, SparseConfig) for c in configs):
            raise ValueError("add_weighted_adapter: all adapters must be sparse adapters")
        wrappers = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        # A densely trained module cannot be summed like a delta: with two trained copies there is no right answer.
        shared = [w for w in wrappers if sum(name in w.modules_to_save for name in adapters) > 1]
        if shared:
            raise ValueError(
                "Cannot add weighted adapters if they target the same module with modules_to_save, but found "
                f"{len(shared)} such instance(s)."
            )
        modules_to_save = sorted({m for c in configs for m in (c.modules_to_save or [])}) or None
        # Low-rank terms combine exactly by concatenation (as LoRA's "cat"): A stacks the adapters' A, B their
        # weighted, scaled B, and the new term has scaling 1.
        ranks = [c.r for c in configs]
        self.peft_config[adapter_name] = dataclasses.replace(
            configs[0],
            num_tunable_weights=None,
            target_modules=_union_of_targets(adapters, configs),
            modules_to_save=modules_to_save,
            r=sum(ranks),
            lora_alpha=sum(ranks) or configs[0].lora_alpha,
            low_rank_lr_ratio=1.0,  # the concatenated factors hold the adapters' scales: the term's scale is 1
        )
        try:
            self._entries_given = True
            try:
                self.inject_adapter(self.model, adapter_name)
            finally:
                self._entries_given = False
            # The one adapter that trained a module in modules_to_save gives the new adapter its trained copy (a
            # fresh copy of the original module would silently drop that training).
            for wrapper in wrappers:
                owners = [name for name in adapters if name in wrapper.modules_to_save]
                if owners and adapter_name in wrapper.modules_to_save:
                    wrapper.modules_to_save[adapter_name].load_state_dict(
                        wrapper.modules_to_save[owners[0]].state_dict()
                    )
            for layer in self._layers_with_adapter(self.model, adapter_name):
                present = [(name, w) for name, w in zip(adapters, weights) if name in layer.sparse_values]
                deltas = [(layer.adapter_delta(name, detach=True), w) for name, w in present]
                union = torch.unique(torch.cat([indices.to(torch.int64) for (indices, _), _ in deltas]))
                values = torch.zeros(union.numel(), dtype=torch.float32, device=union.device)
                for (indices, delta_values), w in deltas:
                    positions = torch.searchsorted(union, indices.to(torch.int64))
                    values.index_add_(0, positions, w * delta_values.float())
                layer.set_sparse_entries(adapter_name, union, values)
                if sum(ranks):
                    _write_concatenated_low_rank(layer, adapter_name, adapters, weights, ranks)
        except Exception:
            del self.peft_config[adapter_name]
            self._remove_adapter_layers(self.model, adapter_name)
            for wrapper in wrappers:
                wrapper.modules_to_save.pop(adapter_name, None)
            raise
        self._mark_only_adapters_as_trainable(self.model)


def _write_concatenated_low_rank(
    layer: SparseLayer, adapter_name: str, adapters: list[str], weights: list[float], ranks: list[int]
) -> None:
    """Give ``adapter_name`` the low-rank term ``sum_a weight_a * scaling_a * B_a @ A_a`` of the given adapters, as
    one term of rank ``sum(ranks)`` (blocks of zeros for an adapter without a term in this layer)."""
    a_blocks, b_blocks = [], []
    for name, weight, rank in zip(adapters, weights, ranks):
        if rank == 0:
            continue
        if name in layer.sparse_lora_A:
            a_blocks.append(layer.sparse_lora_A[name].detach().float())
            b_blocks.append(layer.sparse_lora_B[name].detach().float() * (weight * layer.lora_scaling[name]))
        else:
            a_blocks.append(torch.zeros(rank, layer.in_features))
            b_blocks.append(torch.zeros(layer.out_features, rank))
    with torch.no_grad():
        for container, blocks, dim in ((layer.sparse_lora_A, a_blocks, 0), (layer.sparse_lora_B, b_blocks, 1)):
            target = container[adapter_name]
            target.copy_(torch.cat([b.to(target.device) for b in blocks], dim=dim))
    layer.lora_scaling[adapter_name] = 1.0


def _union_of_targets(adapters: list[str], configs: list[SparseConfig]):
    """The weighted adapter's ``target_modules``: every layer any of the adapters targets (as LoRA combines them)."""
    targets = [c.target_modules for c in configs]
    if all(isinstance(t, str) for t in targets):
        return targets[0] if len(set(targets)) == 1 else "|".join(f"({t})" for t in targets)
    if all(isinstance(t, (set, list, tuple)) for t in targets):
        return set().union(*targets)
    raise ValueError(
        "add_weighted_adapter: cannot combine adapters whose target_modules mix a regex string and a list: "
        + ", ".join(f"{name!r}: {t!r}" for name, t in zip(adapters, targets))
    )


def _inject_adapter_names(module, args, kwargs, adapter_names):
    kwargs["adapter_names"] = adapter_names
    return args, kwargs
