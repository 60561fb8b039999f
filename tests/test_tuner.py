"""The sparse tuner end to end on tiny Llama, GPT-2 (Conv1D), BERT and OPT models."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import MODEL_FAMILIES, llama_of_width, logits, make_batch, tiny_bert, tiny_llama
from transformers.pytorch_utils import Conv1D

from peft_sparse import SparseConfig, SparseLayer, lora_equivalent_budget
from peft_sparse.tuner.layer import Linear as SparseLinear
from peft_sparse.tuner.lookup import sparse_layers


def randomize_values(model, seed: int = 1, scale: float = 0.2, adapter_name: str = "default") -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            values = layer.sparse_values[adapter_name]
            values.copy_(torch.randn(values.shape, generator=generator) * scale)


def build(family: str, model_seed: int = 0, **config_kwargs):
    factory, targets = MODEL_FAMILIES[family]
    config_kwargs.setdefault("target_modules", targets)
    config_kwargs.setdefault("density", 0.1)
    return get_peft_model(factory(model_seed), SparseConfig(**config_kwargs))


def test_layer_state_invariants(family):
    model = build(family)
    for name, layer in sparse_layers(model):
        indices = layer.sparse_indices["default"]
        values = layer.sparse_values["default"]
        assert indices.dtype == torch.int32
        assert values.dtype == torch.float32 and values.requires_grad
        assert not indices.requires_grad
        assert indices.shape == values.shape
        assert bool((indices[1:] > indices[:-1]).all()), name
        assert int(indices.min()) >= 0 and int(indices.max()) < layer.out_features * layer.in_features
        assert not layer.get_base_layer().weight.requires_grad
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".sparse_values." in n for n in trainable)


def test_gpt2_layers_are_conv1d_with_logical_out_in_shape():
    model = build("gpt2")
    layers = dict(sparse_layers(model))
    c_attn = layers["base_model.model.transformer.h.0.attn.c_attn"]
    assert isinstance(c_attn.get_base_layer(), Conv1D)
    assert c_attn.fan_in_fan_out
    assert (c_attn.out_features, c_attn.in_features) == (96, 32)


@pytest.mark.parametrize(("family", "given", "layout"), [("gpt2", False, True), ("llama", True, False)])
def test_a_fan_in_fan_out_that_disagrees_with_the_layer_is_corrected_with_a_warning(family, given, layout):
    with pytest.warns(UserWarning, match=f"fan_in_fan_out is {given} .* setting fan_in_fan_out to {layout}"):
        model = build(family, fan_in_fan_out=given)
    assert model.peft_config["default"].fan_in_fan_out is layout
    assert all(layer.fan_in_fan_out is layout for _, layer in sparse_layers(model))


def test_hooks_on_a_base_layer_that_the_adapted_forward_bypasses_are_reported(monkeypatch):
    import peft_sparse.tuner.layer as layer_module

    monkeypatch.setattr(layer_module, "_hooks_warned", False)
    model = build("llama")
    calls = []
    base = dict(sparse_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"].get_base_layer()
    base.register_forward_pre_hook(lambda module, args: calls.append(module))
    with pytest.warns(UserWarning, match="q_proj.*hooks.*does not run them"):
        model(**make_batch())
    assert calls == []  # what the warning says: the hook did not run
    with model.disable_adapter():  # the base layer's own forward runs its hooks
        model(**make_batch())
    assert calls == [base]


@pytest.mark.parametrize("budget", ["global", "local"])
@pytest.mark.parametrize("density", [0.01, 0.1, 0.37, 1.0])
def test_density_budget_is_exact(budget, density):
    model = build("llama", density=density, budget=budget)
    layers = [layer for _, layer in sparse_layers(model)]
    sizes = [layer.out_features * layer.in_features for layer in layers]
    counts = [layer.sparse_values["default"].numel() for layer in layers]
    if budget == "local":
        assert counts == [math.floor(density * size + 0.5) for size in sizes]
    else:
        assert sum(counts) == math.floor(density * sum(sizes) + 0.5)
        # until salience decides, each layer gets its proportional share (within one entry)
        for count, size in zip(counts, sizes):
            assert abs(count - sum(counts) * size / sum(sizes)) <= 1
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(counts)


@pytest.mark.parametrize("budget", ["global", "local"])
def test_num_tunable_weights_is_exact_and_printed(budget, capsys):
    model = build("opt", num_tunable_weights=1234, budget=budget)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == 1234
    model.print_trainable_parameters()
    assert "trainable params: 1,234 " in capsys.readouterr().out


def test_lora_equivalent_budget_matches_lora_parameter_count():
    from peft import LoraConfig

    targets = ["q_proj", "v_proj", "down_proj"]
    budget = lora_equivalent_budget(tiny_llama(), r=4, target_modules=targets)
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets))
    assert budget == lora.get_nb_trainable_parameters()[0]
    sparse = get_peft_model(tiny_llama(), SparseConfig(target_modules=targets, num_tunable_weights=budget))
    assert sparse.get_nb_trainable_parameters()[0] == budget


def test_all_linear_targets_every_linear_but_the_head():
    model = build("llama", target_modules="all-linear")
    names = {name.rsplit(".", 1)[-1] for name, _ in sparse_layers(model)}
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not isinstance(model.base_model.model.lm_head, SparseLayer)


def test_layers_to_transform_limits_targets():
    model = build("llama", target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers")
    assert [name for name, _ in sparse_layers(model)] == ["base_model.model.model.layers.1.self_attn.q_proj"]


def test_exclude_modules():
    model = build("llama", target_modules="all-linear", exclude_modules=["down_proj"])
    assert not any(name.endswith("down_proj") for name, _ in sparse_layers(model))


def test_initial_mask_is_seeded_and_layer_specific():
    first = build("llama", density=0.2, seed=0)
    again = build("llama", density=0.2, seed=0)
    other = build("llama", density=0.2, seed=7)
    a = [layer.sparse_indices["default"] for _, layer in sparse_layers(first)]
    b = [layer.sparse_indices["default"] for _, layer in sparse_layers(again)]
    c = [layer.sparse_indices["default"] for _, layer in sparse_layers(other)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    # layers of the same shape must not share one mask
    assert not torch.equal(a[0], a[2])


def _dense_reference_grads(peft_model, batch, probe, names):
    """Gradient of ``sum(logits * probe)`` w.r.t. each named weight of a merged dense copy, as (out, in)."""
    dense = copy.deepcopy(peft_model).merge_and_unload()
    modules = dict(dense.named_modules())
    for p in dense.parameters():
        p.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    (dense(**batch).logits * probe).sum().backward()
    grads = {}
    for name in names:
        grad = modules[name].weight.grad
        grads[name] = grad.t() if isinstance(modules[name], Conv1D) else grad
    return grads


def test_values_gradient_equals_gathered_dense_gradient(family):
    model = build(family, density=0.2)
    randomize_values(model)
    model.train()
    batch = make_batch(seed=3)
    with torch.no_grad():
        out_shape = model(**batch).logits.shape
    probe = torch.randn(out_shape, generator=torch.Generator().manual_seed(11))
    (model(**batch).logits * probe).sum().backward()
    prefix = "base_model.model."
    layers = {name[len(prefix) :]: layer for name, layer in sparse_layers(model)}
    reference = _dense_reference_grads(model, batch, probe, list(layers))
    for name, layer in layers.items():
        expected = reference[name].reshape(-1)[layer.sparse_indices["default"].long()]
        torch.testing.assert_close(layer.sparse_values["default"].grad, expected, rtol=1e-4, atol=1e-6)


def _train(model, steps: int = 8, lr: float = 0.05, seed: int = 0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    batch = make_batch(seed=seed, batch=4, length=12)
    is_classifier = "SequenceClassification" in type(model.get_base_model()).__name__
    labels = torch.tensor([0, 1, 2, 1]) if is_classifier else batch["input_ids"]
    model.train()
    losses = []
    for _ in range(steps):
        out = model(**batch, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return losses


def test_training_changes_outputs_and_lowers_loss(family):
    factory, _ = MODEL_FAMILIES[family]
    batch = make_batch()
    before = logits(factory(), batch)
    model = build(family, density=0.2)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model)
    assert losses[-1] < losses[0]
    assert not torch.allclose(logits(model, batch), before, atol=1e-4)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), f"frozen parameter {n} changed"


def test_load_adopts_per_layer_sizes_of_the_checkpoint(tmp_path):
    """A checkpoint whose layers have other k than a fresh allocation (as after global salience) loads exactly."""
    model = build("llama", density=0.05)
    generator = torch.Generator().manual_seed(4)
    for _, layer in sparse_layers(model):
        k = int(torch.randint(0, layer.num_weight_entries // 3, (1,), generator=generator))
        chosen = torch.randperm(layer.num_weight_entries, generator=generator)[:k].sort().values
        layer.set_sparse_entries("default", chosen, torch.randn(k, generator=generator))
    batch = make_batch(seed=2)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)


def _corrupt(tmp_path, mutate):
    model = build("llama", density=0.05)
    randomize_values(model)
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    state = load_file(path)
    key = min(k for k in state if k.endswith("sparse_indices"))
    mutate(state, key, key[: -len("sparse_indices")] + "sparse_values")
    save_file(state, path)
    return tmp_path


def _unsorted(state, ik, vk):
    state[ik] = state[ik].flip(0).contiguous()


def _out_of_range(state, ik, vk):
    state[ik] = state[ik].clone()
    state[ik][-1] = 10**6


def _negative(state, ik, vk):
    state[ik] = state[ik].clone()
    state[ik][0] = -1


def _duplicate(state, ik, vk):
    state[ik] = state[ik].clone()
    state[ik][1] = state[ik][0]


def _float_indices(state, ik, vk):
    state[ik] = state[ik].float()


def _length_mismatch(state, ik, vk):
    state[vk] = state[vk][:-1].contiguous()


def _missing_values(state, ik, vk):
    del state[vk]


def _integer_values(state, ik, vk):
    state[vk] = state[vk].to(torch.int32)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (_unsorted, "sorted and unique"),
        (_duplicate, "sorted and unique"),
        (_out_of_range, r"must lie in \[0, 1024\)"),
        (_negative, r"must lie in \[0, 1024\)"),
        (_float_indices, "integer dtype"),
        (_length_mismatch, "do not match"),
        (_missing_values, "Corrupt sparse adapter"),
        (_integer_values, "floating"),
    ],
)
def test_corrupt_adapter_raises(tmp_path, mutate, message):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(tiny_llama(), path)


def test_loading_onto_a_different_architecture_raises(tmp_path):
    model = build("llama", target_modules=["gate_proj"], density=0.05)
    model.save_pretrained(tmp_path)
    narrower = llama_of_width(32, 8)
    with pytest.raises(ValueError, match=r"gate_proj'.*saved on a layer of shape \(out, in\) = \(48, 32\).*\(8, 32\)"):
        PeftModel.from_pretrained(narrower, tmp_path)


def test_merged_weight_equals_base_plus_delta():
    model = build("gpt2", density=0.2)
    randomize_values(model)
    _, layer = sparse_layers(model)[0]
    base = layer.get_base_layer().weight.detach().clone()  # (in, out) for Conv1D
    delta = torch.zeros(layer.out_features * layer.in_features)
    delta[layer.sparse_indices["default"].long()] = layer.sparse_values["default"].detach()
    layer.merge()
    expected = base + delta.view(layer.out_features, layer.in_features).t()
    torch.testing.assert_close(layer.get_base_layer().weight, expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(layer.get_delta_weight("default"), delta.view(layer.out_features, layer.in_features))


def test_multiple_adapters_set_delete_and_trainability():
    model = build("llama", density=0.1)
    randomize_values(model, seed=1)
    model.add_adapter("other", SparseConfig(target_modules=["q_proj", "v_proj"], density=0.05, seed=3))
    randomize_values(model, seed=2, adapter_name="other")
    batch = make_batch(seed=9)
    default_out = logits(model, batch)
    for _, layer in sparse_layers(model):
        assert not layer.sparse_values["other"].requires_grad
    model.set_adapter("other")
    other_out = logits(model, batch)
    assert not torch.allclose(default_out, other_out, atol=1e-4)
    for _, layer in sparse_layers(model):
        assert layer.sparse_values["other"].requires_grad
        assert not layer.sparse_values["default"].requires_grad
    assert model.get_nb_trainable_parameters()[0] == sum(
        layer.sparse_values["other"].numel() for _, layer in sparse_layers(model)
    )
    model.set_adapter("default")
    torch.testing.assert_close(logits(model, batch), default_out, rtol=0, atol=0)
    model.delete_adapter("other")
    assert all(
        "other" not in layer.sparse_values and "other" not in layer.sparse_indices for _, layer in sparse_layers(model)
    )
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", SparseConfig(target_modules=["q_proj"]))


def test_two_active_adapters_sum_their_deltas():
    model = build("llama", density=0.3)
    randomize_values(model, seed=1)
    model.add_adapter("other", SparseConfig(target_modules=["q_proj", "v_proj"], density=0.3, seed=5))
    randomize_values(model, seed=2, adapter_name="other")
    model.base_model.set_adapter(["default", "other"])
    batch = make_batch(seed=4)
    both = logits(model, batch)
    dense = tiny_llama()
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(model):
            module = modules[name[len("base_model.model.") :]]
            module.weight += layer.get_delta_weight("default") + layer.get_delta_weight("other")
    torch.testing.assert_close(both, logits(dense, batch), rtol=1e-5, atol=1e-5)


def test_add_weighted_adapter_is_union_with_weighted_values():
    model = build("llama", density=0.2)
    randomize_values(model, seed=1)
    model.add_adapter("b", SparseConfig(target_modules=["q_proj", "v_proj"], density=0.2, seed=9))
    randomize_values(model, seed=2, adapter_name="b")
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "mix")
    for name, layer in sparse_layers(model):
        union = torch.unique(torch.cat([layer.sparse_indices["default"].long(), layer.sparse_indices["b"].long()]))
        assert torch.equal(layer.sparse_indices["mix"].long(), union), name
        expected = 0.5 * layer.get_delta_weight("default") - 2.0 * layer.get_delta_weight("b")
        torch.testing.assert_close(layer.get_delta_weight("mix"), expected, rtol=1e-6, atol=1e-6)
        assert not layer.sparse_values["mix"].requires_grad
    with pytest.raises(ValueError, match="weights"):
        model.add_weighted_adapter(["default", "b"], [1.0], "bad")
    with pytest.raises(ValueError, match="do not exist"):
        model.add_weighted_adapter(["default", "nope"], [1.0, 1.0], "bad")
    with pytest.raises(ValueError, match="already exists"):
        model.add_weighted_adapter(["default"], [1.0], "mix")
    assert "bad" not in model.peft_config


def test_modules_to_save_trains_and_saves_the_classifier(tmp_path):
    model = get_peft_model(tiny_bert(), SparseConfig(task_type="SEQ_CLS", target_modules=["query", "value"]))
    head_before = model.base_model.model.classifier.modules_to_save["default"].weight.clone()
    _train(model, steps=4)
    head_after = model.base_model.model.classifier.modules_to_save["default"].weight
    assert not torch.equal(head_before, head_after)
    model.save_pretrained(tmp_path)
    assert any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    batch = make_batch(seed=1)
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_bf16_base_keeps_fp32_values_and_fp32_gradients():
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), SparseConfig(target_modules=["q_proj", "v_proj"]))
    for _, layer in sparse_layers(model):
        assert layer.sparse_values["default"].dtype == torch.float32
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
    batch = make_batch()
    out = model(**batch, labels=batch["input_ids"])
    assert out.logits.dtype == torch.bfloat16
    out.loss.backward()
    for _, layer in sparse_layers(model):
        assert layer.sparse_values["default"].grad.dtype == torch.float32
        assert torch.isfinite(layer.sparse_values["default"].grad).all()


def test_delta_dtype_bfloat16_is_respected():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], delta_dtype="bfloat16"))
    assert all(layer.sparse_values["default"].dtype == torch.bfloat16 for _, layer in sparse_layers(model))


def _module_types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def test_unsupported_layer_type_raises_and_leaves_model_untouched():
    base = tiny_llama()
    before = _module_types(base)
    with pytest.raises(TypeError, match=r"embed_tokens.*Embedding"):
        get_peft_model(base, SparseConfig(target_modules=["q_proj", "embed_tokens"]))
    assert _module_types(base) == before


def test_too_large_budget_raises_and_leaves_model_untouched():
    base = tiny_llama()
    before = _module_types(base)
    with pytest.raises(ValueError, match="num_tunable_weights=100000000"):
        get_peft_model(base, SparseConfig(target_modules=["q_proj"], num_tunable_weights=10**8))
    assert _module_types(base) == before


def test_failed_add_adapter_leaves_existing_adapter_intact():
    model = build("llama")
    randomize_values(model)
    batch = make_batch()
    expected = logits(model, batch)
    with pytest.raises(ValueError, match="num_tunable_weights"):
        model.add_adapter("big", SparseConfig(target_modules=["q_proj", "v_proj"], num_tunable_weights=10**8))
    assert "big" not in model.peft_config
    for _, layer in sparse_layers(model):
        assert list(layer.sparse_values.keys()) == ["default"]
    torch.testing.assert_close(logits(model, batch), expected, rtol=0, atol=0)


def test_set_sparse_entries_validates():
    model = build("llama")
    _, layer = sparse_layers(model)[0]
    with pytest.raises(ValueError, match="sorted and unique"):
        layer.set_sparse_entries("default", torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="does not exist"):
        layer.set_sparse_entries("nope", torch.tensor([1, 3]))
    with pytest.raises(ValueError, match="to match the indices"):
        layer.set_sparse_entries("default", torch.tensor([1, 3]), torch.zeros(3))
    layer.set_sparse_entries("default", torch.tensor([1, 3], dtype=torch.int64), torch.tensor([0.5, -1.0]))
    assert layer.sparse_indices["default"].dtype == torch.int32
    assert layer.sparse_values["default"].requires_grad


def test_sparse_linear_layer_repr_and_type():
    model = build("llama")
    _, layer = sparse_layers(model)[0]
    assert isinstance(layer, SparseLinear)
    assert repr(layer).startswith("sparse.")


def test_lora_equivalent_budget_matches_lora_on_all_linear_with_a_task_head():
    from peft import LoraConfig

    budget = lora_equivalent_budget(tiny_bert(), 4, "all-linear", task_type="SEQ_CLS")
    lora = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", target_modules="all-linear", r=4))
    assert budget == sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


ADAPTER_FILE = "adapter_model.safetensors"


def llama(hidden: int):
    return llama_of_width(hidden, 2 * hidden)


# --- a saved adapter only loads onto layers of the shape it was saved from -----------------------------------------
@pytest.mark.parametrize("other_hidden", [96, 128])
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_adapter_saved_on_another_shape_is_refused(tmp_path, other_hidden, low_cpu_mem_usage):
    """Hidden 64 -> 96 / 128 kept every flat index in range, so the entries used to land on other (row, col)s."""
    model = get_peft_model(llama(64), SparseConfig(target_modules="all-linear", density=0.01, init_weights=False))
    model.save_pretrained(tmp_path)
    message = r"saved on a layer of shape \(out, in\) = \(64, 64\), this layer is \((96|128), \1\)"
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj'.*" + message):
        PeftModel.from_pretrained(llama(other_hidden), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    same_shape = get_peft_model(llama(other_hidden), SparseConfig(target_modules="all-linear", density=0.01))
    with pytest.raises(ValueError, match=message):
        same_shape.load_adapter(tmp_path, adapter_name="other", low_cpu_mem_usage=low_cpu_mem_usage)


def test_adapter_saved_without_shapes_loads_with_a_warning(tmp_path):
    """Files from before the shape record: loaded where the index range check passes, with a warning."""
    model = get_peft_model(llama(64), SparseConfig(target_modules=["q_proj"], density=0.05, init_weights=False))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    save_file({k: v for k, v in tensors.items() if ".sparse_shape" not in k}, tmp_path / ADAPTER_FILE)
    batch = make_batch(seed=3)
    with pytest.warns(UserWarning, match="saved without layer shapes"):
        loaded = PeftModel.from_pretrained(llama(64), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
    with pytest.warns(UserWarning, match="saved without layer shapes"):
        loaded = PeftModel.from_pretrained(llama(64), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_file_missing_a_layers_tensors_names_the_keys(tmp_path, low_cpu_mem_usage):
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj", "v_proj"], density=0.05))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / ADAPTER_FILE)
    save_file({k: v for k, v in tensors.items() if "layers.1.self_attn.v_proj" not in k}, tmp_path / ADAPTER_FILE)
    if low_cpu_mem_usage:
        with pytest.raises(ValueError, match=r"no tensors for .*layers\.1\.self_attn\.v_proj\.sparse_indices"):
            PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=True)
    else:
        # The regular load keeps peft's behaviour: it warns about the missing keys and the layer keeps its fresh
        # identity adapter.
        with pytest.warns(UserWarning, match=r"missing adapter keys.*layers\.1\.self_attn\.v_proj"):
            PeftModel.from_pretrained(tiny_llama(), tmp_path)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_a_config_targeting_fewer_modules_than_the_file_holds_says_what_was_not_loaded(tmp_path, low_cpu_mem_usage):
    """peft loads adapters with strict=False: the file's tensors for untargeted modules were dropped silently."""

    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj", "v_proj"], init_weights=False))
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["target_modules"] = ["q_proj"]
    config_file.write_text(json.dumps(config))
    with pytest.warns(
        UserWarning, match=r"tensor\(s\) of 2 module\(s\) were not loaded.*layers\.0\.self_attn\.v_proj"
    ):
        PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
    config["target_modules"] = ["q_proj", "v_proj"]
    config_file.write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*were not loaded")
        PeftModel.from_pretrained(tiny_llama(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage)
