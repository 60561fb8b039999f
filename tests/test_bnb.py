"""QLoRA-style sparse tuning over bitsandbytes 4-bit and 8-bit layers, on the CPU (bitsandbytes quantises on CPU).

The judge is always the dense model that computes with the quantised weights dequantised
(``tiny_models.dequantised_copy``): same adapter, same values, so outputs and value gradients must agree.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

from peft_sparse import SparseConfig, SparseLayer, lora_equivalent_budget, select_mask
from peft_sparse.tuner import bnb as sparse_bnb

from tiny_models import VOCAB, dequantised_copy, make_batch, quantised_tiny_llama

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev extra; the 4-bit tests need it")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative L2 error allowed against the fp32 dense judge, by compute dtype.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 8e-3}


def four_bit(quant_type="nf4", double_quant=True, compute_dtype=torch.float32):
    return dict(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double_quant,
                bnb_4bit_compute_dtype=compute_dtype)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llama")


def sparse(model, **kwargs):
    kwargs.setdefault("target_modules", TARGETS)
    kwargs.setdefault("density", 0.05)
    return get_peft_model(model, SparseConfig(**kwargs))


def layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseLayer)]


def randomize(model, seed=1, scale=0.05):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in layers(model):
            values = layer.sparse_values["default"]
            values.copy_(torch.randn(values.shape, generator=generator) * scale)


def rel_error(actual, expected):
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {name: layer.sparse_values["default"].grad.clone() for name, layer in layers(model)}
    return out.logits.detach(), grads


def quantised_and_dense(model_dir, bnb_kwargs, batch_seed):
    """(logits, value gradients) of a sparse adapter on the quantised model and, with the same adapter, on the dense
    model that computes with the dequantised weights."""
    quantised = sparse(quantised_tiny_llama(model_dir, **bnb_kwargs))
    dense = sparse(dequantised_copy(quantised.get_base_model()))
    batch = make_batch(seed=batch_seed)
    results = []
    for model in (quantised, dense):
        randomize(model)
        results.append(loss_and_grads(model, batch))
    return results


def test_bitsandbytes_layers_get_quantised_sparse_layers(model_dir):
    model = sparse(quantised_tiny_llama(model_dir, **four_bit()))
    kinds = {type(layer) for _, layer in layers(model)}
    assert kinds == {sparse_bnb.Linear4bit}
    assert all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for _, layer in layers(model))
    q_proj = dict(layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    assert q_proj.logical_shape == (32, 32)  # from the module, not the packed (512, 1) storage
    model8 = sparse(quantised_tiny_llama(model_dir, load_in_8bit=True))
    assert {type(layer) for _, layer in layers(model8)} == {sparse_bnb.Linear8bitLt}


@pytest.mark.parametrize("compute", list(COMPUTE_DTYPES))
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_outputs_and_value_gradients_match_the_dequantised_dense_model(model_dir, quant_type, double_quant,
                                                                             compute):
    compute_dtype = COMPUTE_DTYPES[compute]
    (logits_q, grads_q), (logits_d, grads_d) = quantised_and_dense(
        model_dir, four_bit(quant_type, double_quant, compute_dtype), batch_seed=3
    )
    tolerance = TOLERANCE[compute_dtype]
    assert rel_error(logits_q, logits_d) < tolerance
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == 14
    for name in grads_q:
        assert grads_q[name].dtype == torch.float32  # values stay in delta_dtype whatever the compute dtype
        assert rel_error(grads_q[name], grads_d[name]) < 10 * tolerance, name


def test_8bit_outputs_and_value_gradients_match_the_dequantised_dense_model(model_dir):
    (logits_q, grads_q), (logits_d, grads_d) = quantised_and_dense(model_dir, dict(load_in_8bit=True), batch_seed=4)
    assert rel_error(logits_q, logits_d) < 1e-5
    for name in grads_q:
        assert rel_error(grads_q[name], grads_d[name]) < 1e-4, name


@pytest.mark.parametrize(
    "bnb_kwargs",
    [four_bit("nf4", True, torch.bfloat16), four_bit("fp4", False, torch.float32), dict(load_in_8bit=True)],
    ids=["nf4-dq-bf16", "fp4-fp32", "int8"],
)
def test_quantised_sparse_tuning_lowers_the_loss(model_dir, bnb_kwargs):
    model = sparse(quantised_tiny_llama(model_dir, **bnb_kwargs), density=0.1)
    model.train()
    packed_before = {name: layer.get_base_layer().weight.data.clone() for name, layer in layers(model)}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = make_batch(seed=5, batch=4, length=12)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for name, layer in layers(model):
        assert layer.sparse_values["default"].dtype == torch.float32
        assert torch.equal(layer.get_base_layer().weight.data, packed_before[name])  # the base stays frozen


def test_prepare_model_for_kbit_training_and_gradient_checkpointing(model_dir):
    batch = make_batch(seed=6)
    results = {}
    for mode in ("plain", "reentrant", "non-reentrant"):
        base = quantised_tiny_llama(model_dir, **four_bit("nf4", True, torch.float32))
        if mode == "plain":
            base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        else:
            base = prepare_model_for_kbit_training(
                base, use_gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"},
            )
            assert base.is_gradient_checkpointing
        model = sparse(base)
        randomize(model)
        model.train()
        results[mode] = loss_and_grads(model, batch)
    logits, grads = results["plain"]
    assert any(g.abs().sum() > 0 for g in grads.values())
    for mode in ("reentrant", "non-reentrant"):
        assert torch.allclose(results[mode][0], logits, atol=1e-6)
        for name in grads:
            assert torch.allclose(results[mode][1][name], grads[name], atol=1e-7, rtol=1e-5), (mode, name)


@pytest.mark.parametrize(
    "bnb_kwargs",
    [four_bit("nf4", True, torch.float32), four_bit("fp4", False, torch.float32), dict(load_in_8bit=True)],
    ids=["nf4", "fp4", "int8"],
)
def test_save_load_onto_quantised_and_unquantised_models(model_dir, tmp_path, bnb_kwargs):
    model = sparse(quantised_tiny_llama(model_dir, **bnb_kwargs), density=0.05, selection="magnitude")
    randomize(model, scale=0.3)
    batch = make_batch(seed=7)
    expected = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(quantised_tiny_llama(model_dir, **bnb_kwargs), tmp_path)
    assert torch.equal(reloaded(**batch).logits, expected)

    # Onto the unquantised model: equal to quantisation tolerance, i.e. as close as the two bases are to each other.
    from tiny_models import tiny_llama

    quantised_base, dense_base = quantised_tiny_llama(model_dir, **bnb_kwargs), tiny_llama()
    base_gap = (quantised_base(**batch).logits - dense_base(**batch).logits).norm()
    on_dense = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    adapter_gap = (on_dense(**batch).logits - expected).norm()
    assert adapter_gap < 1.5 * base_gap
    # ... and the adapter is really there: without it the dense model is farther from the adapted one.
    assert (dense_base(**batch).logits - expected).norm() > 2 * adapter_gap


def _block_absmax(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = weight.reshape(-1)
    pad = (-flat.numel()) % blocksize
    flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, blocksize).abs().amax(dim=1).repeat_interleave(blocksize)[: weight.numel()].view_as(weight)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_merge_is_within_one_quantisation_step_and_unmerge_restores_the_bytes(model_dir, quant_type):
    model = sparse(quantised_tiny_llama(model_dir, **four_bit(quant_type, True, torch.float32)))
    randomize(model, scale=0.1)
    batch = make_batch(seed=8)
    unmerged_logits = model(**batch).logits.detach()
    originals = {}
    for name, layer in layers(model):
        weight = layer.get_base_layer().weight
        originals[name] = (weight.data.clone(), weight.quant_state.absmax.clone(), layer.dequantized_weight())
    sparse_bnb._requantisation_warned = False
    with pytest.warns(UserWarning, match="re-quantises"):
        model.merge_adapter()
    # Largest gap between neighbouring codes, relative to the block's absmax: NF4 0.304, FP4 1/3; rounding to
    # nearest is off by at most half of it (plus the absmax's own 8-bit double quantisation, well under 2%).
    half_step = {"nf4": 0.3038 / 2, "fp4": 1 / 6}[quant_type] * 1.02
    for name, layer in layers(model):
        target = originals[name][2] + layer.get_delta_weight("default")
        merged = layer.dequantized_weight()
        bound = half_step * _block_absmax(target, 64) + 1e-6
        assert ((merged - target).abs() <= bound).all(), name
        assert not torch.equal(merged, originals[name][2])  # the delta really went in
    assert torch.isfinite(model(**batch).logits).all()
    model.unmerge_adapter()
    for name, layer in layers(model):
        weight = layer.get_base_layer().weight
        assert torch.equal(weight.data, originals[name][0])
        assert torch.equal(weight.quant_state.absmax, originals[name][1])
    assert torch.equal(model(**batch).logits, unmerged_logits)


def test_4bit_merge_and_unload_leaves_4bit_layers(model_dir):
    model = sparse(quantised_tiny_llama(model_dir, **four_bit("nf4", True, torch.float32)))
    randomize(model, scale=0.1)
    batch = make_batch(seed=9)
    adapted = model(**batch).logits.detach()
    with pytest.warns(UserWarning) if not sparse_bnb._requantisation_warned else _nothing():
        merged = model.merge_and_unload()
    assert not layers(merged)
    q_proj = merged.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.weight.dtype == torch.uint8
    assert rel_error(merged(**batch).logits, adapted) < 0.2


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_8bit_merge_and_unmerge(model_dir):
    model = sparse(quantised_tiny_llama(model_dir, load_in_8bit=True))
    randomize(model, scale=0.1)
    batch = make_batch(seed=10)
    unmerged_logits = model(**batch).logits.detach()
    originals = {name: layer.dequantized_weight() for name, layer in layers(model)}
    model.merge_adapter()
    for name, layer in layers(model):
        target = originals[name] + layer.get_delta_weight("default")
        # int8 row-wise rounding to nearest: half a step (absmax / 254), plus the fp16 rounding bitsandbytes
        # applies to its input before quantising.
        row_step = target.abs().amax(dim=1, keepdim=True) / 127
        bound = row_step / 2 + target.abs() * 2.0**-10 + 1e-7
        assert ((layer.dequantized_weight() - target).abs() <= bound).all(), name
    assert rel_error(model(**batch).logits, unmerged_logits) < 0.05
    model.unmerge_adapter()
    for name, layer in layers(model):
        assert torch.equal(layer.dequantized_weight(), originals[name])
    assert torch.equal(model(**batch).logits, unmerged_logits)


def test_lora_equivalent_budget_counts_the_logical_shape_of_quantised_layers(model_dir):
    from tiny_models import tiny_llama

    for bnb_kwargs in (four_bit(), dict(load_in_8bit=True)):
        quantised = quantised_tiny_llama(model_dir, **bnb_kwargs)
        assert lora_equivalent_budget(quantised, 4, TARGETS) == lora_equivalent_budget(tiny_llama(), 4, TARGETS)


def test_8bit_layer_with_fp16_weights_is_refused(model_dir):
    from transformers import BitsAndBytesConfig  # noqa: F401  (the config route cannot make one on CPU)

    model = quantised_tiny_llama(model_dir, load_in_8bit=True)
    layer = model.model.layers[0].self_attn.q_proj
    layer.state.has_fp16_weights = True
    with pytest.raises(TypeError, match=r"q_proj.*has_fp16_weights=True"):
        sparse(model)
    assert not layers(model)  # nothing half-applied


class _FakeQuantLinear(nn.Module):
    """A quantised linear layer type peft-sparse does not know (int8 weight, not bitsandbytes)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(32, 32, dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x


def test_unknown_quantised_layer_type_raises_type_error_naming_module_and_type(model_dir):
    model = quantised_tiny_llama(model_dir, **four_bit())
    model.model.layers[1].self_attn.v_proj = _FakeQuantLinear()
    with pytest.raises(TypeError, match=r"layers\.1\.self_attn\.v_proj.*quantised layer.*_FakeQuantLinear"):
        sparse(model)
    assert not layers(model)


@pytest.mark.parametrize("selection", ["gradient", "magnitude", "snip", "fisher"])
def test_select_mask_on_a_4bit_model_equals_selection_on_the_dequantised_model(model_dir, selection):
    quantised = sparse(quantised_tiny_llama(model_dir, **four_bit("nf4", True, torch.float32)), selection=selection)
    dense = sparse(dequantised_copy(quantised.get_base_model()), selection=selection)
    data = [make_batch(seed=s) | {"labels": make_batch(seed=s)["input_ids"]} for s in range(3)]
    for model in (quantised, dense):
        select_mask(model, data, num_batches=3)
    for (name, layer_q), (_, layer_d) in zip(layers(quantised), layers(dense)):
        assert torch.equal(layer_q.sparse_indices["default"], layer_d.sparse_indices["default"]), name


def test_synflow_refuses_a_4bit_model(model_dir):
    model = sparse(quantised_tiny_llama(model_dir, **four_bit()), selection="synflow")
    with pytest.raises(ValueError, match="synflow.*4-bit"):
        select_mask(model, [make_batch()], num_batches=1)


def test_sft_trainer_runs_on_a_4bit_model_with_a_sparse_adapter(model_dir, tmp_path):
    trl = pytest.importorskip("trl", reason="trl is in the dev extra")
    datasets = pytest.importorskip("datasets")
    from tiny_models import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    base = prepare_model_for_kbit_training(quantised_tiny_llama(model_dir, **four_bit("nf4", True, torch.float32)),
                                           use_gradient_checkpointing=False)
    model = sparse(base, density=0.1)
    before = {name: layer.sparse_values["default"].detach().clone() for name, layer in layers(model)}
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(16)]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_length=16,
                         dataset_text_field="text")
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tokenizer)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(layer.sparse_values["default"], before[name]) for name, layer in layers(model))
