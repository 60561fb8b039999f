"""Inputs that used to give a silently wrong result now raise (or warn) with a message naming the problem."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import llama_of_width, make_batch, tiny_llama
from transformers import LlamaForCausalLM

from peft_sparse import SparseConfig, select_mask
from peft_sparse.tuner.lookup import sparse_layers

ADAPTER_FILE = "adapter_model.safetensors"


def llama(hidden: int) -> LlamaForCausalLM:
    return llama_of_width(hidden, 2 * hidden)


def batches(count: int = 2, labels: bool = True) -> list[dict[str, torch.Tensor]]:
    result = []
    for seed in range(count):
        batch = make_batch(seed=seed)
        if labels:
            batch["labels"] = batch["input_ids"].clone()
        result.append(batch)
    return result


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
    import json

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


# --- salience ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("selection", ["gradient", "fisher", "snip"])
def test_non_finite_loss_in_salience_names_the_batch(bad, selection):
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05, selection=selection))
    before = [layer.sparse_indices["default"].clone() for _, layer in sparse_layers(model)]

    def loss_fn(outputs, batch):
        loss = outputs.loss
        return loss * bad if batch["input_ids"][0, 0] == batches()[1]["input_ids"][0, 0] else loss

    with pytest.raises(ValueError, match=rf"salience batch 1 \(0-based\) is {bad}"):
        select_mask(model, batches(3), loss_fn=loss_fn)
    after = [layer.sparse_indices["default"] for _, layer in sparse_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing half-applied


# --- hand-written training loops -----------------------------------------------------------------------------------
def test_an_optimizer_built_before_select_mask_trains_the_selected_entries():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj", "v_proj"], density=0.05))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    select_mask(model, batches())
    values = [layer.sparse_values["default"] for _, layer in sparse_layers(model)]
    assert all(id(v) in held for v in values)  # the same Parameter objects, resized
    for batch in batches(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert all(v.detach().abs().sum() > 0 for v in values if v.numel())


def test_select_mask_after_training_refuses_to_zero_the_trained_values():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05))
    select_mask(model, batches())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**batches(1)[0]).loss.backward()
    optimizer.step()
    trained = [layer.sparse_values["default"].detach().clone() for _, layer in sparse_layers(model)]
    with pytest.raises(ValueError, match=r"holds trained values in 2 layer\(s\).*reset_values=True"):
        select_mask(model, batches())
    assert all(torch.equal(t, layer.sparse_values["default"]) for t, (_, layer) in zip(trained, sparse_layers(model)))
    select_mask(model, batches(), reset_values=True)  # deliberate
    assert all(not layer.sparse_values["default"].any() for _, layer in sparse_layers(model))


def test_select_mask_accepts_fresh_init_weights_false_values_but_not_edited_ones():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05, init_weights=False))
    probe = copy.deepcopy(model)
    select_mask(model, batches())  # the seeded initial values are not training: nothing is lost
    with torch.no_grad():
        sparse_layers(probe)[0][1].sparse_values["default"][0] += 1.0
    with pytest.raises(ValueError, match="holds trained values in 1 layer"):
        select_mask(probe, batches())


# --- budgets and configs -------------------------------------------------------------------------------------------
def test_num_tunable_weights_zero_is_refused():
    with pytest.raises(ValueError, match=r"num_tunable_weights must be >= 1, got 0"):
        SparseConfig(target_modules=["q_proj"], num_tunable_weights=0)


@pytest.mark.parametrize("budget", ["global", "local"])
def test_density_that_rounds_to_no_entry_is_refused_and_nothing_is_injected(budget):
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"density=1e-07 gives 0 trainable entries over the \d+ weights"):
        get_peft_model(base, SparseConfig(target_modules=["q_proj"], density=1e-7, budget=budget))
    assert not sparse_layers(base)


def test_a_config_mutated_after_construction_is_validated_at_injection():
    config = SparseConfig(target_modules=["q_proj"], density=0.05)
    config.density = 5.0
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 5\.0"):
        get_peft_model(base, config)
    assert not sparse_layers(base)
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05))
    config.density, config.selection = 0.05, "gradients"
    with pytest.raises(ValueError, match=r"selection must be one of .* got 'gradients'"):
        model.add_adapter("other", config)
    assert "other" not in model.peft_config
    assert all("other" not in layer.sparse_values for _, layer in sparse_layers(model))
