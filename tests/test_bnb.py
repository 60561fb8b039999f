"""QLoRA-style sparse tuning over bitsandbytes 4-bit and 8-bit layers, on the CPU (bitsandbytes quantises on CPU).

The judge is the dense model that computes with the quantised weights dequantised: same adapter, same values, so
outputs and value gradients must agree. 4-bit weights are decoded for the judge by peft-sparse's own pure-PyTorch
reference in float64 (``tiny_models.reference_dequantised_copy``), not by bitsandbytes, whose CPU ``dequantize_4bit``
and ``Linear4bit`` forward are wrong on some CPUs for ``in_features`` that are not a multiple of the 64-element
block (``bnb_defects``), as in the 32-wide ``tiny_llama``. Agreement with bitsandbytes' own decode and forward is
tested separately, on the 64-aligned ``tiny_llama_aligned`` everywhere and on ``tiny_llama`` where the runtime probes
in ``bnb_defects`` find bitsandbytes sound.
"""

from __future__ import annotations

import pytest
import torch
from bnb_defects import dequantize_4bit_defect, linear4bit_forward_defect
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from tiny_models import (
    assert_within_one_quantisation_step,
    decode_4bit,
    decoded,
    four_bit,
    make_batch,
    quantised_model,
    quantised_tiny_llama,
    reference_dequantised_copy,
    tiny_llama,
    tiny_llama_aligned,
)
from torch import nn

from peft_sparse import SparseConfig, SparseLayer, lora_equivalent_budget, select_mask
from peft_sparse.tuner import bnb as sparse_bnb

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev extra; the 4-bit tests need it")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative L2 error allowed against the dense judge (float64, or fp32 where said), by compute dtype.
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 8e-3}
# The two tiny llamas: "in32" has linear layers with in_features 32 and 48 (not multiples of bitsandbytes' 64-element
# 4-bit block), "in64" only 64 and 128, as real models have.
MODELS = {"in32": tiny_llama, "in64": tiny_llama_aligned}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return {name: tmp_path_factory.mktemp(f"tiny_llama_{name}") for name in MODELS}


@pytest.fixture(scope="module")
def model_dir(model_dirs):
    return model_dirs["in32"]


def quantised(model_dirs, model, **bnb_kwargs):
    """The tiny llama named ``model`` (a key of ``MODELS``) loaded through bitsandbytes with ``bnb_kwargs``."""
    return quantised_model(model_dirs[model], MODELS[model], **bnb_kwargs)


def reference_dense(quantised_base, model, dtype=torch.float64):
    """The dense model computing what ``quantised_base`` computes, its 4-bit weights decoded by our reference."""
    return reference_dequantised_copy(quantised_base, MODELS[model], dtype=dtype)


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
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch, labels=batch["input_ids"])
    out.loss.backward()
    grads = {name: layer.sparse_values["default"].grad.clone() for name, layer in layers(model)}
    return out.logits.detach(), grads


def quantised_and_dense(model_dirs, model, bnb_kwargs, batch_seed):
    """(logits, value gradients) of a sparse adapter on the quantised model and, with the same adapter, on the float64
    dense model that computes with the 4-bit weights decoded by our reference (int8 ones by bitsandbytes' formula)."""
    quantised_peft = sparse(quantised(model_dirs, model, **bnb_kwargs))
    dense = sparse(reference_dense(quantised_peft.get_base_model(), model))
    batch = make_batch(seed=batch_seed)
    results = []
    for peft_model in (quantised_peft, dense):
        randomize(peft_model)
        results.append(loss_and_grads(peft_model, batch))
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


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("compute", list(COMPUTE_DTYPES))
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_outputs_and_value_gradients_match_the_dequantised_dense_model(
    model_dirs, quant_type, double_quant, compute, model
):
    """Judge: the float64 dense model with our reference decode of the 4-bit weights."""
    compute_dtype = COMPUTE_DTYPES[compute]
    (logits_q, grads_q), (logits_d, grads_d) = quantised_and_dense(
        model_dirs, model, four_bit(quant_type, double_quant, compute_dtype), batch_seed=3
    )
    tolerance = TOLERANCE[compute_dtype]
    assert rel_error(logits_q, logits_d) < tolerance
    assert grads_q.keys() == grads_d.keys() and len(grads_q) == 14
    for name in grads_q:
        assert grads_q[name].dtype == torch.float32  # values stay in delta_dtype whatever the compute dtype
        assert rel_error(grads_q[name], grads_d[name]) < 10 * tolerance, name


def bitsandbytes_defect(model):
    """The skip reason for comparing with bitsandbytes' own 4-bit decode and forward on ``model``: on the 64-aligned
    model never; on the 32-wide one where the runtime probes find bitsandbytes' CPU path defective (``bnb_defects``),
    and only then."""
    if model == "in64":
        return None
    return dequantize_4bit_defect() or linear4bit_forward_defect()


def bitsandbytes_inference_tolerance(quantised_base):
    """Relative L2 error allowed for bitsandbytes' own forward of an fp32-compute 4-bit model in eval mode without
    grad: where the CPU has AVX512-BF16, bitsandbytes computes that with its bf16 inference kernel (it converts input
    and scales to bf16), elsewhere in fp32 from ``dequantize_4bit``."""
    layer = next(m for m in quantised_base.modules() if isinstance(m, bnb.nn.Linear4bit))
    return TOLERANCE[torch.bfloat16] if layer.support_avx512bf16_for_cpu else TOLERANCE[torch.float32]


def assert_bitsandbytes_computes_the_reference(quantised_base, dense, batch):
    """bitsandbytes' own forward of ``quantised_base`` (no sparse layer involved) against ``dense``: in training mode
    (input requiring grad: ``dequantize_4bit`` and an fp32 matmul) and then in eval mode without grad (its inference
    kernel; this repacks the weights, so it comes last)."""
    expected = dense(**batch).logits.detach()
    quantised_base.train()
    quantised_base.get_input_embeddings().weight.requires_grad_(True)  # the layers' inputs require grad
    assert rel_error(quantised_base(**batch).logits, expected) < TOLERANCE[torch.float32]
    quantised_base.eval()
    with torch.no_grad():
        logits = quantised_base(**batch).logits
    assert rel_error(logits, expected) < bitsandbytes_inference_tolerance(quantised_base)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_decodes_and_computes_what_the_reference_decodes(model_dirs, quant_type, double_quant, model):
    """The reference decode is bitsandbytes' own: ``dequantize_4bit`` equals it bit for bit in fp32, and bitsandbytes'
    forward of the 4-bit model computes the dense model built on it."""
    if reason := bitsandbytes_defect(model):
        pytest.skip(reason)
    base = quantised(model_dirs, model, **four_bit(quant_type, double_quant, torch.float32))
    layers4 = [(name, m) for name, m in base.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers4) == 14
    for name, layer in layers4:
        weight = layer.weight
        theirs = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        assert theirs.dtype == torch.float32
        assert torch.equal(theirs.double(), decode_4bit(weight.data, weight.quant_state)), name
    assert_bitsandbytes_computes_the_reference(base, reference_dense(base, model), make_batch(seed=11))


def test_8bit_outputs_and_value_gradients_match_the_dequantised_dense_model(model_dirs):
    (logits_q, grads_q), (logits_d, grads_d) = quantised_and_dense(
        model_dirs, "in32", {"load_in_8bit": True}, batch_seed=4
    )
    assert rel_error(logits_q, logits_d) < 1e-5
    for name in grads_q:
        assert rel_error(grads_q[name], grads_d[name]) < 1e-4, name


@pytest.mark.parametrize(
    "bnb_kwargs",
    [four_bit("nf4", True, torch.bfloat16), four_bit("fp4", False, torch.float32), {"load_in_8bit": True}],
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
                base,
                use_gradient_checkpointing=True,
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
    [four_bit("nf4", True, torch.float32), four_bit("fp4", False, torch.float32), {"load_in_8bit": True}],
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
    # The quantised base as the sparse layers compute it: its weights decoded by our reference (not bitsandbytes'
    # forward, which on some CPUs mis-decodes these 32-wide layers: bnb_defects).
    quantised_base, dense_base = reference_dense(quantised_tiny_llama(model_dir, **bnb_kwargs), "in32"), tiny_llama()
    base_gap = (quantised_base(**batch).logits - dense_base(**batch).logits).norm()
    on_dense = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    adapter_gap = (on_dense(**batch).logits - expected).norm()
    assert adapter_gap < 1.5 * base_gap
    # ... and the adapter is really there: without it the dense model is farther from the adapted one.
    assert (dense_base(**batch).logits - expected).norm() > 2 * adapter_gap


def assert_requantised_from(layer, target32, name):
    """The merged weight's bytes and scales are bitsandbytes' quantisation of ``target32`` (the fp32 weight the merge
    computed: our decode plus the delta) with the layer's settings: the merge re-quantises exactly that."""
    weight = layer.get_base_layer().weight
    state = weight.quant_state
    packed, expected = bnb.functional.quantize_4bit(
        target32, blocksize=state.blocksize, quant_type=state.quant_type, compress_statistics=state.nested
    )
    assert torch.equal(weight.data.view(torch.uint8), packed.view(torch.uint8)), name
    assert torch.equal(state.absmax, expected.absmax), name
    if state.nested:
        assert torch.equal(state.state2.absmax, expected.state2.absmax), name
        assert float(state.offset) == float(expected.offset), name


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_merge_is_within_one_quantisation_step_and_unmerge_restores_the_bytes(model_dirs, quant_type, model):
    """Judge: our float64 reference decode of the weights before and after the merge (bitsandbytes' forward of the
    merged model is tested in test_4bit_merged_model_runs_in_bitsandbytes)."""
    peft_model = sparse(quantised(model_dirs, model, **four_bit(quant_type, True, torch.float32)))
    randomize(peft_model, scale=0.1)
    batch = make_batch(seed=8)
    unmerged_logits = peft_model(**batch).logits.detach()
    base_logits = reference_dense(peft_model.get_base_model(), model)(**batch).logits.detach()
    originals = {}
    for name, layer in layers(peft_model):
        weight = layer.get_base_layer().weight
        originals[name] = (weight.data.clone(), weight.quant_state.absmax.clone(), decoded(layer))
        assert torch.equal(layer.dequantized_weight().double(), originals[name][2]), name  # the layer decodes so too
    sparse_bnb._requantisation_warned = False
    with pytest.warns(UserWarning, match="re-quantises"):
        peft_model.merge_adapter()
    for name, layer in layers(peft_model):
        delta = layer.get_delta_weight("default")
        target = originals[name][2] + delta.double()
        merged = decoded(layer)
        assert torch.equal(layer.dequantized_weight().double(), merged), name
        assert_within_one_quantisation_step(merged, target, quant_type, name)
        assert_requantised_from(layer, originals[name][2].float() + delta, name)
        assert not torch.equal(merged, originals[name][2])  # the delta really went in
    # What the merged model computes, by our decode: the adapted model's function up to the re-quantisation error,
    # far closer to it than the base without the delta is.
    merged_logits = reference_dense(peft_model.get_base_model(), model)(**batch).logits
    assert rel_error(merged_logits, unmerged_logits) < 0.5 * rel_error(base_logits, unmerged_logits)
    peft_model.unmerge_adapter()
    for name, layer in layers(peft_model):
        weight = layer.get_base_layer().weight
        assert torch.equal(weight.data, originals[name][0])
        assert torch.equal(weight.quant_state.absmax, originals[name][1])
    assert torch.equal(peft_model(**batch).logits, unmerged_logits)


def merged_and_unloaded(model_dirs, model, batch):
    """(the adapted model's logits on ``batch``, the base model's by our decode, the model after merge_and_unload,
    {module name: (the merge's fp32 target weight, the original weight's float64 decode)})."""
    peft_model = sparse(quantised(model_dirs, model, **four_bit("nf4", True, torch.float32)))
    randomize(peft_model, scale=0.1)
    adapted = peft_model(**batch).logits.detach()
    base = reference_dense(peft_model.get_base_model(), model)(**batch).logits.detach()
    prefix = "base_model.model."
    targets = {
        name[len(prefix) :]: (decoded(layer).float() + layer.get_delta_weight("default"), decoded(layer))
        for name, layer in layers(peft_model)
    }
    with pytest.warns(UserWarning) if not sparse_bnb._requantisation_warned else _nothing():
        merged = peft_model.merge_and_unload()
    return adapted, base, merged, targets


@pytest.mark.parametrize("model", list(MODELS))
def test_4bit_merge_and_unload_leaves_4bit_layers(model_dirs, model):
    """Judge of the merged weights and of what the merged model computes: our reference decode."""
    batch = make_batch(seed=9)
    adapted, base, merged, targets = merged_and_unloaded(model_dirs, model, batch)
    assert not layers(merged)
    modules = dict(merged.named_modules())
    assert len(targets) == 14
    for name, (target32, original) in targets.items():
        layer = modules[name]
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.dtype == torch.uint8, name
        weight = decode_4bit(layer.weight.data, layer.weight.quant_state)
        assert_within_one_quantisation_step(weight, target32.double(), "nf4", name)
        assert not torch.equal(weight, original), name
    merged_logits = reference_dense(merged, model)(**batch).logits
    assert rel_error(merged_logits, adapted) < 0.5 * rel_error(base, adapted)


@pytest.mark.parametrize("model", list(MODELS))
def test_4bit_merged_model_runs_in_bitsandbytes(model_dirs, model):
    """After merge_and_unload the model is plain bitsandbytes: its own forward computes what our reference decode
    of the re-quantised weights says."""
    if reason := bitsandbytes_defect(model):
        pytest.skip(reason)
    batch = make_batch(seed=9)
    _, _, merged, _ = merged_and_unloaded(model_dirs, model, batch)
    assert_bitsandbytes_computes_the_reference(merged, reference_dense(merged, model), batch)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("double_quant", [True, False], ids=["double-quant", "single-quant"])
def test_4bit_layer_with_no_adapter_applied_computes_the_base_and_keeps_its_weight(model_dirs, double_quant, model):
    """With the adapter disabled (eval mode, no grad: how a base-model comparison runs) the layer computes the base
    weight as our reference decodes it, and afterwards the adapted forward and the base weight are unchanged. (It
    used to run bitsandbytes' own forward, which on AVX512-BF16 CPUs repacks the weight in place and could not be
    undone exactly, or fails where in_features is not a multiple of the blocksize.)"""
    peft_model = sparse(quantised(model_dirs, model, **four_bit("nf4", double_quant, torch.float32)))
    randomize(peft_model)
    batch = make_batch(seed=12)
    adapted = peft_model(**batch).logits.detach()
    weights = {name: decoded(layer) for name, layer in layers(peft_model)}
    base = reference_dense(peft_model.get_base_model(), model)(**batch).logits
    with peft_model.disable_adapter(), torch.no_grad():
        disabled = peft_model(**batch).logits
    assert rel_error(disabled, base) < TOLERANCE[torch.float32]
    assert torch.equal(peft_model(**batch).logits, adapted)
    for name, layer in layers(peft_model):
        assert torch.equal(decoded(layer), weights[name]), name


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
    for bnb_kwargs in (four_bit(), {"load_in_8bit": True}):
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
    """Judge: the fp32 dense model on our reference decode (exact in fp32, so the same arithmetic as the 4-bit
    layers' and the same selected entries, bit for bit)."""
    quantised_peft = sparse(
        quantised_tiny_llama(model_dir, **four_bit("nf4", True, torch.float32)), selection=selection
    )
    dense = sparse(reference_dense(quantised_peft.get_base_model(), "in32", dtype=torch.float32), selection=selection)
    data = [make_batch(seed=s) | {"labels": make_batch(seed=s)["input_ids"]} for s in range(3)]
    for model in (quantised_peft, dense):
        select_mask(model, data, num_batches=3)
    for (name, layer_q), (_, layer_d) in zip(layers(quantised_peft), layers(dense)):
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
    base = prepare_model_for_kbit_training(
        quantised_tiny_llama(model_dir, **four_bit("nf4", True, torch.float32)), use_gradient_checkpointing=False
    )
    model = sparse(base, density=0.1)
    before = {name: layer.sparse_values["default"].detach().clone() for name, layer in layers(model)}
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(6)) for i in range(16)]
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=16,
        dataset_text_field="text",
    )
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_dict({"text": texts}), processing_class=tokenizer
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(layer.sparse_values["default"], before[name]) for name, layer in layers(model))


@pytest.mark.parametrize("model", list(MODELS))
def test_4bit_disabled_adapter_equals_a_zero_delta_and_mixed_batches_work(model_dirs, model):
    """One decode for both paths: a zero delta gives exactly what the disabled adapter gives; rows of a mixed adapter
    batch match the runs with each adapter alone."""
    peft_model = sparse(quantised(model_dirs, model, **four_bit("nf4", True, torch.float32))).eval()
    batch = make_batch(seed=13, batch=3)
    with torch.no_grad():
        zero_delta = peft_model(**batch).logits
        with peft_model.disable_adapter():
            disabled = peft_model(**batch).logits
    assert torch.equal(zero_delta, disabled)
    randomize(peft_model)
    peft_model.add_adapter("other", SparseConfig(target_modules=TARGETS, density=0.05, init_weights=False))
    with torch.no_grad():
        alone = {}
        for name in ("default", "other"):
            peft_model.set_adapter(name)
            alone[name] = peft_model(**batch).logits
        mixed = peft_model(**batch, adapter_names=["other", "__base__", "default"]).logits
    torch.testing.assert_close(mixed[0], alone["other"][0])
    torch.testing.assert_close(mixed[1], disabled[1])
    torch.testing.assert_close(mixed[2], alone["default"][2])


def test_4bit_safe_merge_with_a_nan_changes_no_layer(model_dirs):
    peft_model = sparse(quantised(model_dirs, "in64", **four_bit("nf4", True, torch.float32)))
    randomize(peft_model, scale=0.1)
    named = layers(peft_model)
    packed = {name: layer.get_base_layer().weight.data.clone() for name, layer in named}
    with torch.no_grad():
        named[-1][1].sparse_values["default"][0] = float("nan")
    assert [layer.merged_weight_is_finite() for _, layer in named] == [True] * (len(named) - 1) + [False]
    with pytest.raises(ValueError, match=r"NaNs or infs .* of 1 layer\(s\).*Nothing was merged"):
        peft_model.merge_and_unload(safe_merge=True)
    assert [name for name, _ in layers(peft_model)] == [name for name, _ in named]
    for name, layer in layers(peft_model):
        assert not layer.merged and torch.equal(layer.get_base_layer().weight.data, packed[name]), name
