"""A sparse adapter behaves like a built-in peft tuner.

The behaviours are the ones upstream peft's generic adapter tests (``testing_common.PeftCommonTester`` through
``tests/test_custom_models.py``) check for every tuner, written here in our own words and run over every kind of
SparseConfig: one or several targets, regex / list / "all-linear" targeting, a global or local budget, an absolute
count, modules_to_save, a pinned delta dtype, dynamic and SpIEL configs, and GPT-2 ``Conv1D`` layers.
Non-identity adapters come from ``init_weights=False``, as in peft's own tests.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from tiny_models import MODEL_FAMILIES, make_batch
from torch import nn

from peft_sparse import SparseConfig, SparseTrainingCallback
from peft_sparse.tuner.lookup import sparse_layers


class MLP(nn.Module):
    """Three linear layers and a head: enough for targeting, modules_to_save and multi-adapter cases."""

    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(12, 24)
        self.lin1 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.lin1(torch.relu(self.lin0(X.to(self.lin0.weight.dtype)))))
        return torch.log_softmax(self.head(hidden).float(), dim=-1)


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(dtype).eval()


def inputs(seed: int = 0, rows: int = 9) -> dict[str, torch.Tensor]:
    return {"X": torch.randn(rows, 12, generator=torch.Generator().manual_seed(seed))}


# (name, model factory, config kwargs): every config is a non-identity adapter (init_weights=False).
VARIANTS = [
    ("regex", "mlp", {"target_modules": "lin0", "density": 0.2}),
    ("list", "mlp", {"target_modules": ["lin0", "lin1"], "density": 0.2}),
    ("local budget", "mlp", {"target_modules": ["lin0", "lin1"], "density": 0.1, "budget": "local", "seed": 3}),
    ("count", "mlp", {"target_modules": ["lin0", "lin1"], "num_tunable_weights": 50}),
    ("modules_to_save", "mlp", {"target_modules": ["lin0"], "density": 0.2, "modules_to_save": ["head"]}),
    ("all-linear", "mlp", {"target_modules": "all-linear", "density": 0.2}),
    ("pinned bf16", "mlp", {"target_modules": ["lin1"], "density": 0.2, "delta_dtype": "bfloat16"}),
    ("dynamic", "mlp", {"target_modules": ["lin0", "lin1"], "density": 0.2, "update": "dynamic"}),
    ("spiel", "mlp", {"target_modules": ["lin0", "lin1"], "density": 0.2, "update": "spiel", "update_interval": 5}),
    ("conv1d", "gpt2", {"target_modules": ["c_attn", "c_proj"], "density": 0.1}),
    # the sparse + low-rank hybrid (RoSA): every behaviour again with a low-rank term beside the entries
    (
        "hybrid",
        "mlp",
        {"target_modules": ["lin0", "lin1"], "density": 0.1, "r": 2, "lora_alpha": 4, "modules_to_save": ["head"]},
    ),
    ("hybrid conv1d", "gpt2", {"target_modules": ["c_attn", "c_proj"], "density": 0.05, "r": 2}),
    # the other tiny model families of tests/tiny_models.py: a causal Llama and OPT, a BERT sequence classifier
    ("llama", "llama", {"target_modules": MODEL_FAMILIES["llama"][1], "density": 0.1}),
    ("opt", "opt", {"target_modules": MODEL_FAMILIES["opt"][1], "density": 0.1}),
    ("bert", "bert", {"target_modules": MODEL_FAMILIES["bert"][1], "density": 0.1}),
]
IDS = [name for name, _, _ in VARIANTS]


def base_model(kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    return mlp(dtype=dtype) if kind == "mlp" else MODEL_FAMILIES[kind][0]().to(dtype).eval()


def model_inputs(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    if kind == "mlp":
        return inputs(seed)
    batch = make_batch(seed=seed, batch=3)
    return {"input_ids": batch["input_ids"]}


def output(model, batch) -> torch.Tensor:
    with torch.no_grad():
        result = model(**batch)
    return (result if isinstance(result, torch.Tensor) else result.logits).float()


def make(kind: str, kwargs: dict, name: str = "default", **config_overrides):
    config = SparseConfig(**{**kwargs, "init_weights": False, **config_overrides})
    return get_peft_model(base_model(kind), config, adapter_name=name)


@pytest.fixture(params=VARIANTS, ids=IDS)
def variant(request):
    return request.param


# --- init_weights ------------------------------------------------------------------------------------------------
def test_init_weights_true_is_the_identity(variant):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    expected = output(base_model(kind), batch)
    model = get_peft_model(base_model(kind), SparseConfig(**kwargs))
    torch.testing.assert_close(output(model, batch), expected)
    assert all(not layer.sparse_values["default"].any() for _, layer in sparse_layers(model))


def test_init_weights_false_is_seeded_and_changes_the_output(variant):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    first, again = make(kind, kwargs), make(kind, kwargs)
    assert not torch.allclose(output(first, batch), output(base_model(kind), batch))
    torch.testing.assert_close(output(first, batch), output(again, batch), rtol=0, atol=0)
    other_seed = make(kind, kwargs, seed=kwargs.get("seed", 0) + 7)
    assert not torch.allclose(output(first, batch), output(other_seed, batch))


def test_adapter_name_makes_no_difference(variant):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    torch.testing.assert_close(output(make(kind, kwargs), batch), output(make(kind, kwargs, name="other"), batch))


# --- saving and loading ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "pickle"])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["load", "low_cpu_mem_usage"])
def test_save_and_load_roundtrip(variant, tmp_path, safe_serialization, low_cpu_mem_usage):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    model = make(kind, kwargs)
    expected = output(model, batch)
    model.save_pretrained(tmp_path, safe_serialization=safe_serialization)
    saved = get_peft_model_state_dict(model)

    loaded = PeftModel.from_pretrained(base_model(kind), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    torch.testing.assert_close(output(loaded, batch), expected, rtol=0, atol=0)
    reloaded = get_peft_model_state_dict(loaded)
    assert saved.keys() == reloaded.keys()
    for key in saved:
        assert saved[key].dtype == reloaded[key].dtype, key
        torch.testing.assert_close(saved[key], reloaded[key], rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.parameters())  # loaded for inference by default
    trainable = PeftModel.from_pretrained(base_model(kind), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == model.get_nb_trainable_parameters()[0]
    assert all(".default" not in key for key in saved)  # saved without the adapter's name, as peft saves LoRA
    assert all(p.device.type != "meta" for p in loaded.parameters())
    assert all(b.device.type != "meta" for b in loaded.buffers())


def test_load_adapter_into_a_second_slot_and_switch(variant, tmp_path):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    first, second = make(kind, kwargs), make(kind, kwargs, seed=11)
    first.save_pretrained(tmp_path / "first")
    second.save_pretrained(tmp_path / "second")
    model = PeftModel.from_pretrained(base_model(kind), tmp_path / "first")
    model.load_adapter(tmp_path / "second", adapter_name="second")
    torch.testing.assert_close(output(model, batch), output(first, batch))
    model.set_adapter("second")
    torch.testing.assert_close(output(model, batch), output(second, batch))


def test_saved_state_holds_only_adapter_tensors(variant):
    _, kind, kwargs = variant
    model = make(kind, kwargs)
    keys = get_peft_model_state_dict(model).keys()
    allowed = (
        "sparse_indices",
        "sparse_values",
        "sparse_residual_indices",
        "sparse_residual_values",
        "sparse_shape",
        "sparse_lora_A",
        "sparse_lora_B",
    )
    for key in keys:
        assert any(f".{part}" in key for part in allowed) or "head" in key, key
    assert any(".sparse_shape" in key for key in keys)
    if "modules_to_save" in kwargs:
        assert any(key.startswith("base_model.model.head.") for key in keys)


# --- merging -----------------------------------------------------------------------------------------------------
def test_merge_unmerge_safe_merge_and_merge_and_unload(variant):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    model = make(kind, kwargs)
    base_out = output(base_model(kind), batch)
    adapted = output(model, batch)
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch), adapted, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        model.merge_adapter()  # idempotent: a second merge adds nothing
    torch.testing.assert_close(output(model, batch), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, batch), adapted, rtol=1e-5, atol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), base_out, rtol=1e-5, atol=1e-5)
    model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(output(model, batch), adapted, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    unloaded = model.merge_and_unload(safe_merge=True)
    assert not sparse_layers(unloaded) and type(unloaded) is type(base_model(kind))
    torch.testing.assert_close(output(unloaded, batch), adapted, rtol=1e-5, atol=1e-5)


def test_unload_gives_back_the_base_model(variant):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    unloaded = make(kind, kwargs).unload()
    assert not sparse_layers(unloaded)
    torch.testing.assert_close(output(unloaded, batch), output(base_model(kind), batch))


def test_safe_merge_refuses_a_non_finite_adapter_and_leaves_the_weight(variant):
    _, kind, kwargs = variant
    model = make(kind, kwargs)
    layer = sparse_layers(model)[0][1]
    before = layer.get_base_layer().weight.clone()
    with torch.no_grad():
        layer.sparse_values["default"][0] = float("nan")
    with pytest.raises(ValueError, match="NaNs"):
        model.merge_adapter(safe_merge=True)
    torch.testing.assert_close(layer.get_base_layer().weight, before, rtol=0, atol=0)


def test_a_refused_safe_merge_changes_no_layer(variant):
    """One NaN in the last layer: merge_adapter and merge_and_unload with safe_merge raise before any layer is
    merged or unloaded (layer by layer, all but one were merged and unloaded first)."""
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    model = make(kind, kwargs)
    layers = sparse_layers(model)
    before = {name: layer.get_base_layer().weight.clone() for name, layer in layers}
    with torch.no_grad():
        layers[-1][1].sparse_values["default"][-1] = float("nan")
    for merge in (lambda: model.merge_adapter(safe_merge=True), lambda: model.merge_and_unload(safe_merge=True)):
        with pytest.raises(ValueError, match=r"NaNs or infs .* of 1 layer\(s\).*Nothing was merged"):
            merge()
        assert [name for name, _ in sparse_layers(model)] == list(before)  # nothing unloaded
        for name, layer in sparse_layers(model):
            assert not layer.merged, name
            torch.testing.assert_close(layer.get_base_layer().weight, before[name], rtol=0, atol=0)
    with torch.no_grad():
        layers[-1][1].sparse_values["default"][-1] = 0.0
    adapted = output(model, batch)
    torch.testing.assert_close(output(model.merge_and_unload(safe_merge=True), batch), adapted, rtol=1e-5, atol=1e-5)


def test_disable_adapter_restores_the_state_it_found(variant):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    model = make(kind, kwargs)
    adapted, base_out = output(model, batch), output(base_model(kind), batch)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), base_out)
    torch.testing.assert_close(output(model, batch), adapted)
    model.merge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), base_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(output(model, batch), adapted, rtol=1e-5, atol=1e-5)


# --- precision ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward_is_finite_and_close_to_fp32(variant, dtype):
    _, kind, kwargs = variant
    batch = model_inputs(kind)
    reference = output(make(kind, kwargs), batch)
    config = SparseConfig(**{**kwargs, "init_weights": False})
    model = get_peft_model(base_model(kind, dtype), config, autocast_adapter_dtype=False)
    result = output(model, batch)
    assert torch.isfinite(result).all()
    torch.testing.assert_close(result, reference, rtol=0.1, atol=0.1)
    model.merge_adapter()
    assert torch.isfinite(output(model, batch)).all()


# --- training ----------------------------------------------------------------------------------------------------
def test_training_changes_only_the_adapters_parameters(variant):
    _, kind, kwargs = variant
    model = make(kind, kwargs)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    adapter_parts = ("sparse_values", "sparse_lora_A", "sparse_lora_B", "modules_to_save")
    assert trainable and all(any(part in n for part in adapter_parts) for n in trainable), trainable
    assert any("sparse_lora_A" in n for n in trainable) == bool(kwargs.get("r")), trainable
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        batch = model_inputs(kind, seed=step)
        out = model(**batch)
        loss = (out if isinstance(out, torch.Tensor) else out.logits).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, p in model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == (name in trainable), name


# peft < 0.19's PeftModel.add_adapter has no autocast_adapter_dtype (it always autocasts).
ADD_ADAPTER_TAKES_AUTOCAST = "autocast_adapter_dtype" in inspect.signature(PeftModel.add_adapter).parameters


# --- adapter dtype -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("autocast", [True, False], ids=["autocast", "no-autocast"])
@pytest.mark.parametrize("delta_dtype", [None, "float32", "bfloat16"], ids=lambda d: f"delta={d}")
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True], ids=["load", "low_cpu_mem_usage"])
def test_adapter_dtype_follows_peft_unless_the_config_pins_it(
    tmp_path, base_dtype, autocast, delta_dtype, low_cpu_mem_usage
):
    """delta_dtype=None: float32 with autocast_adapter_dtype=True, else the base dtype (peft's rule). A pinned
    delta_dtype wins. Both hold through get_peft_model, add_adapter, from_pretrained and load_adapter, with and
    without low_cpu_mem_usage (which used to cast the values to the base layer's dtype)."""
    expected = {None: torch.float32 if autocast else base_dtype, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        delta_dtype
    ]
    config = SparseConfig(target_modules=["lin0", "lin1"], density=0.2, init_weights=False, delta_dtype=delta_dtype)

    def value_dtypes(model):
        return {p.dtype for n, p in model.named_parameters() if "sparse_values" in n}

    if not autocast and not ADD_ADAPTER_TAKES_AUTOCAST:
        pytest.skip("this peft's PeftModel.add_adapter cannot turn autocast_adapter_dtype off")
    model = get_peft_model(mlp(dtype=base_dtype), config, autocast_adapter_dtype=autocast)
    add_kwargs = {"autocast_adapter_dtype": autocast} if ADD_ADAPTER_TAKES_AUTOCAST else {}
    model.add_adapter("other", copy.deepcopy(config), **add_kwargs)
    assert value_dtypes(model) == {expected}
    saved = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
    model.save_pretrained(tmp_path, selected_adapters=["default", "other"])

    loaded = PeftModel.from_pretrained(
        mlp(dtype=base_dtype), tmp_path, autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
    )
    loaded.load_adapter(
        tmp_path / "other", adapter_name="other", autocast_adapter_dtype=autocast, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert value_dtypes(loaded) == {expected}
    # The saved values come back exactly: nothing was rounded through the base dtype on the way.
    for key, value in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value.to(saved[key].dtype), saved[key], rtol=0, atol=0)


# --- several adapters --------------------------------------------------------------------------------------------
def two_adapters(first: dict, second: dict):
    model = get_peft_model(mlp(), SparseConfig(**first, init_weights=False), adapter_name="one")
    model.add_adapter("two", SparseConfig(**second, init_weights=False))
    return model


SAME = ({"target_modules": ["lin0"], "density": 0.2}, {"target_modules": ["lin0"], "density": 0.3, "seed": 4})
DIFFERENT = ({"target_modules": ["lin0"], "density": 0.2}, {"target_modules": ["lin1"], "density": 0.2, "seed": 4})


def single(kwargs: dict) -> nn.Module:
    return get_peft_model(mlp(), SparseConfig(**kwargs, init_weights=False))


@pytest.mark.parametrize("pair", [SAME, DIFFERENT], ids=["same targets", "different targets"])
def test_multiple_active_adapters_add_their_deltas(pair):
    batch = inputs()
    model = two_adapters(*pair)
    model.base_model.set_adapter(["one", "two"])
    both = output(model, batch)
    base_out = output(mlp(), batch)
    assert not torch.allclose(both, output(single(pair[0]), batch))
    assert not torch.allclose(both, output(single(pair[1]), batch))
    model.merge_adapter(["one", "two"])
    torch.testing.assert_close(output(model, batch), both, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch), base_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pair", [SAME, DIFFERENT], ids=["same targets", "different targets"])
def test_mixed_adapter_batch_runs_each_row_through_its_adapter(pair):
    batch = inputs(rows=9)
    model = two_adapters(*pair).eval()
    with model.disable_adapter():
        base_out = output(model, batch)
    model.set_adapter("one")
    out_a = output(model, batch)
    model.set_adapter("two")
    out_b = output(model, batch)
    names = ["__base__", "one", "two"] * 3
    mixed = output(model, {**batch, "adapter_names": names})
    torch.testing.assert_close(mixed[0::3], base_out[0::3])
    torch.testing.assert_close(mixed[1::3], out_a[1::3])
    torch.testing.assert_close(mixed[2::3], out_b[2::3])
    assert model.active_adapters == ["two"]  # the forward left the model's state alone


def test_mixed_adapter_batch_refusals():
    model = two_adapters(*SAME).eval()
    batch = inputs(rows=3)
    with pytest.raises(ValueError, match="non-existing adapter.*typo"):
        model(**batch, adapter_names=["one", "typo", "__base__"])
    with pytest.raises(ValueError, match="should be the same as the number of inputs.*2 and 3"):
        model(**batch, adapter_names=["one", "two"])
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        model(**batch, adapter_names=["one", "two", "one"])
    model.eval()
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged adapters"):
        model(**batch, adapter_names=["one", "two", "one"])


def test_mixed_adapter_batch_with_modules_to_save():
    config = {"target_modules": ["lin0"], "density": 0.2, "modules_to_save": ["head"]}
    model = two_adapters(config, {**config, "seed": 5}).eval()
    for adapter in ("one", "two"):
        with torch.no_grad():
            model.base_model.model.head.modules_to_save[adapter].bias.add_(1.0 if adapter == "one" else -1.0)
    batch = inputs(rows=4)
    expected = {}
    for adapter in ("one", "two"):
        model.set_adapter(adapter)
        expected[adapter] = output(model, batch)
    mixed = output(model, {**batch, "adapter_names": ["one", "two", "two", "one"]})
    torch.testing.assert_close(mixed[[0, 3]], expected["one"][[0, 3]])
    torch.testing.assert_close(mixed[[1, 2]], expected["two"][[1, 2]])


def test_requires_grad_follows_the_active_adapter_and_inference_mode():
    model = two_adapters(*SAME)

    def trainable():
        return {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad}

    assert trainable() == {"one"}
    model.set_adapter("two")
    assert trainable() == {"two"}
    model.base_model.set_adapter(["one", "two"])
    assert trainable() == {"one", "two"}
    model.add_adapter("c", SparseConfig(target_modules=["lin1"], density=0.2, inference_mode=True))
    assert "c" not in trainable()


def test_delete_adapter_leaves_nothing_behind(tmp_path):
    model = two_adapters(*SAME)
    layer = model.base_model.model.lin0
    layer.mask_chosen.add("two")  # as select_mask or a load would
    model.delete_adapter("two")
    assert "two" not in model.peft_config
    assert not [n for n, _ in model.named_parameters() if n.endswith(".two")]
    assert not [n for n, _ in model.named_buffers() if n.endswith(".two")]
    assert "two" not in layer.mask_chosen and "two" not in layer.values_dtype
    # Re-adding the name starts a fresh adapter: SparseTrainingCallback selects its mask again.
    model.add_adapter("two", SparseConfig(target_modules=["lin0"], density=0.2))
    model.set_adapter("two")
    assert "two" not in layer.mask_chosen
    calls = []
    callback = SparseTrainingCallback(data=[inputs()], loss_fn=lambda out, batch: out.mean())
    callback._select = lambda *args: calls.append(args)
    state = type("State", (), {"global_step": 0, "max_steps": 1, "log_history": []})()
    callback.on_train_begin(None, state, None, model=model, optimizer=None)
    assert len(calls) == 1


def test_delete_adapter_refusals():
    model = two_adapters(*SAME)
    with pytest.raises(ValueError, match="typo"):
        model.delete_adapter("typo")
    model.merge_adapter(["one"])
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['one'\] while they are merged"):
        model.delete_adapter("one")
    assert "one" in model.peft_config and "one" in model.base_model.model.lin0.sparse_values
    model.unmerge_adapter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.delete_adapter("one")  # the active one: another becomes active
    assert model.active_adapters == ["two"]


# --- add_weighted_adapter ----------------------------------------------------------------------------------------
def delta(model, layer_name: str, adapter: str) -> torch.Tensor:
    return getattr(model.base_model.model, layer_name).get_delta_weight(adapter)


@pytest.mark.parametrize("pair", [SAME, DIFFERENT], ids=["same targets", "different targets"])
def test_add_weighted_adapter_sums_the_deltas_over_the_union_of_targets(pair):
    model = two_adapters(*pair)
    model.add_weighted_adapter(["one", "two"], [0.5, -2.0], adapter_name="mix")
    targets = set(pair[0]["target_modules"]) | set(pair[1]["target_modules"])
    for layer_name in targets:
        layer = getattr(model.base_model.model, layer_name)
        weights = (("one", 0.5), ("two", -2.0))
        expected = sum(w * layer.get_delta_weight(n) for n, w in weights if n in layer.sparse_values)
        torch.testing.assert_close(delta(model, layer_name, "mix"), expected)
    model.set_adapter("mix")
    batch = inputs()
    with pytest.raises(AssertionError):
        torch.testing.assert_close(output(model, batch), output(mlp(), batch))


def test_add_weighted_adapter_with_a_negative_weight_negates():
    model = two_adapters(*SAME)
    model.add_weighted_adapter(["one"], [-1.0], adapter_name="minus")
    torch.testing.assert_close(delta(model, "lin0", "minus"), -delta(model, "lin0", "one"))


def test_add_weighted_adapter_refuses_two_trained_copies_of_a_module():
    config = {"target_modules": ["lin0"], "density": 0.2, "modules_to_save": ["head"]}
    model = two_adapters(config, {**config, "seed": 2})
    with pytest.raises(ValueError, match="same module with modules_to_save, but found 1 such instance"):
        model.add_weighted_adapter(["one", "two"], [1.0, 1.0], adapter_name="mix")
    assert "mix" not in model.peft_config
    assert "mix" not in model.base_model.model.lin0.sparse_values
    assert "mix" not in model.base_model.model.head.modules_to_save


def test_add_weighted_adapter_keeps_the_one_trained_module_to_save():
    model = two_adapters(
        {"target_modules": ["lin0"], "density": 0.2},
        {"target_modules": ["lin0"], "density": 0.2, "modules_to_save": ["head"], "seed": 2},
    )
    head = model.base_model.model.head
    with torch.no_grad():
        head.modules_to_save["two"].weight.mul_(3.0)  # "trained"
    model.add_weighted_adapter(["one", "two"], [1.0, 1.0], adapter_name="mix")
    torch.testing.assert_close(head.modules_to_save["mix"].weight, head.modules_to_save["two"].weight)
