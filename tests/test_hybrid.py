"""The sparse + low-rank hybrid (RoSA): ``SparseConfig(r > 0)`` adds ``(lora_alpha / r) * B @ A`` to every sparse
layer's delta, on dense and 4-bit bases.

The judge is a float64 dense model whose weights are ``W0 + scatter(indices, values) + scaling * B @ A`` computed
here from the adapter's tensors (4-bit weights decoded by peft-sparse's own reference), and peft's LoRA with the
same factors. Merge, save/load, multiple adapters and the dtype matrix are also covered for hybrid configs by
``test_peft_conformance.py`` (its "hybrid" variants).
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import (
    assert_within_one_quantisation_step,
    decoded,
    four_bit,
    make_batch,
    quantised_tiny_llama,
    reference_dequantised_copy,
    tiny_gpt2,
    tiny_llama,
)

from peft_sparse import SparseConfig, SparseLayer, lora_equivalent_budget
from peft_sparse.tuner import bnb as sparse_bnb
from peft_sparse.tuner.lookup import sparse_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]


def dense_delta(layer: SparseLayer, name: str = "default") -> torch.Tensor:
    """The adapter's delta in float64, from its tensors (not from the layer's own delta code)."""
    delta = torch.zeros(layer.logical_shape, dtype=torch.float64)
    indices, values = layer.sparse_indices[name].long(), layer.sparse_values[name].detach().double()
    delta.view(-1).index_add_(0, indices, values)
    if name in layer.sparse_lora_A:
        lora_b, lora_a = layer.sparse_lora_B[name].detach().double(), layer.sparse_lora_A[name].detach().double()
        delta += layer.lora_scaling[name] * lora_b @ lora_a
    return delta


def reference_logits(peft_model, dense_base, batch, names=("default",)) -> torch.Tensor:
    """Logits of ``dense_base`` (float64) with every adapted weight replaced by ``W0 + sum of deltas``."""
    modules = dict(dense_base.named_modules())
    with torch.no_grad():
        for name, layer in sparse_layers(peft_model):
            target = modules[name.removeprefix("base_model.model.")]
            delta = sum(dense_delta(layer, n) for n in names)
            if layer.fan_in_fan_out:
                delta = delta.t()
            target.weight += delta
        return dense_base(**batch).logits


def randomise_values(model, seed: int = 1, scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparse_layers(model):
            for values in layer.sparse_values.values():
                values.copy_(torch.randn(values.shape, generator=generator) * scale)


def _train(model, optimizer, steps: int = 3) -> None:
    model.train()
    for step in range(steps):
        batch = make_batch(seed=step)
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_fresh_hybrid_is_the_identity_and_counts_entries_and_factors():
    base = tiny_llama()
    batch = make_batch()
    expected = base(**batch).logits.detach()
    budget = lora_equivalent_budget(base, r=2, target_modules=TARGETS)
    model = get_peft_model(base, SparseConfig(target_modules=TARGETS, num_tunable_weights=budget, r=2))
    assert torch.equal(model(**batch).logits, expected)
    layers = [layer for _, layer in sparse_layers(model)]
    assert all(not layer.sparse_lora_B["default"].any() for layer in layers)
    entries = sum(layer.sparse_values["default"].numel() for layer in layers)
    factors = sum(2 * (layer.in_features + layer.out_features) for layer in layers)
    assert entries == budget  # the budget counts sparse entries only
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == entries + factors


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
def test_forward_and_gradients_match_the_dense_float64_reference(factory):
    config = SparseConfig(target_modules="all-linear", density=0.05, r=3, lora_alpha=5, init_weights=False)
    model = get_peft_model(factory(), config)
    randomise_values(model)
    batch = make_batch(seed=2)
    reference = reference_logits(
        model, factory(dtype=torch.float64) if factory is tiny_llama else factory().double(), batch
    )
    model.train()
    out = model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.logits.double(), reference, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    for name, layer in sparse_layers(model):
        for part in (layer.sparse_values, layer.sparse_lora_A, layer.sparse_lora_B):
            grad = part["default"].grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name


def test_low_rank_term_is_loras():
    """With no sparse entries' contribution (values zero), the hybrid computes exactly what peft's LoRA computes
    with the same factors and scaling."""
    batch = make_batch(seed=3)
    hybrid = get_peft_model(
        tiny_llama(),
        SparseConfig(
            target_modules=TARGETS, density=0.02, r=4, lora_alpha=8, init_weights=False, low_rank_lr_ratio=1.0
        ),
    )
    with torch.no_grad():
        for _, layer in sparse_layers(hybrid):
            layer.sparse_values["default"].zero_()
    lora = get_peft_model(tiny_llama(), LoraConfig(target_modules=TARGETS, r=4, lora_alpha=8, lora_dropout=0.0))
    lora_layers = {name: m for name, m in lora.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    with torch.no_grad():
        for name, layer in sparse_layers(hybrid):
            lora_layers[name].lora_A["default"].weight.copy_(layer.sparse_lora_A["default"])
            lora_layers[name].lora_B["default"].weight.copy_(layer.sparse_lora_B["default"])
    torch.testing.assert_close(hybrid(**batch).logits, lora(**batch).logits, rtol=1e-5, atol=1e-6)


def test_training_moves_entries_and_factors_and_merge_keeps_the_function(tmp_path):
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=TARGETS, density=0.05, r=2))
    _train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2), steps=4)
    model.eval()
    batch = make_batch(seed=9)
    trained = model(**batch).logits.detach()
    for _, layer in sparse_layers(model):
        assert layer.sparse_lora_B["default"].abs().sum() > 0 and layer.sparse_values["default"].abs().sum() > 0
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(loaded(**batch).logits, trained, rtol=0, atol=0)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_weighted_adapter_of_hybrids_is_the_weighted_sum_of_deltas():
    model = get_peft_model(
        tiny_llama(),
        SparseConfig(target_modules=TARGETS, density=0.05, r=2, lora_alpha=4, init_weights=False),
        adapter_name="one",
    )
    model.add_adapter("two", SparseConfig(target_modules=["q_proj"], density=0.03, r=3, seed=5, init_weights=False))
    model.add_adapter("plain", SparseConfig(target_modules=TARGETS, density=0.02, seed=7, init_weights=False))
    model.add_weighted_adapter(["one", "two", "plain"], [0.7, -1.5, 2.0], "mix")
    for name, layer in sparse_layers(model):
        expected = sum(
            w * dense_delta(layer, n)
            for n, w in (("one", 0.7), ("two", -1.5), ("plain", 2.0))
            if n in layer.sparse_values
        )
        assert layer.sparse_lora_A["mix"].shape[0] == 5
        torch.testing.assert_close(dense_delta(layer, "mix"), expected, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(layer.get_delta_weight("mix").double(), expected, rtol=1e-5, atol=1e-6, msg=name)


def test_multiple_active_hybrid_adapters_add_up():
    model = get_peft_model(
        tiny_llama(), SparseConfig(target_modules=TARGETS, density=0.05, r=2, init_weights=False), adapter_name="one"
    )
    model.add_adapter("two", SparseConfig(target_modules=TARGETS, density=0.05, r=1, seed=4, init_weights=False))
    model.base_model.set_adapter(["one", "two"])
    batch = make_batch(seed=4)
    reference = reference_logits(model, tiny_llama(dtype=torch.float64), batch, names=("one", "two"))
    torch.testing.assert_close(model(**batch).logits.double(), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "r, alpha, ratio, error",
    [
        (-1, 8, 1.0, ValueError),
        (True, 8, 1.0, TypeError),
        (2.0, 8, 1.0, TypeError),
        (2, 0, 1.0, ValueError),
        (2, float("nan"), 1.0, ValueError),
        (2, "8", 1.0, TypeError),
        (2, 8, 0.0, ValueError),
        (2, 8, -3.0, ValueError),
        (2, 8, float("inf"), ValueError),
        (2, 8, True, TypeError),
        (2, 8, "3", TypeError),
    ],
)
def test_invalid_low_rank_settings_are_refused_naming_the_field(r, alpha, ratio, error):
    with pytest.raises(error, match=r"SparseConfig\.(r|lora_alpha|low_rank_lr_ratio) must"):
        SparseConfig(target_modules=TARGETS, r=r, lora_alpha=alpha, low_rank_lr_ratio=ratio)


def _hybrid(ratio: float, init_weights: bool = False):
    config = SparseConfig(
        target_modules=TARGETS, density=0.05, r=2, lora_alpha=4, init_weights=init_weights, low_rank_lr_ratio=ratio
    )
    return get_peft_model(tiny_llama(), config)


def test_a_low_rank_lr_ratio_is_the_same_term_trained_by_adam_at_that_multiple_of_the_rate():
    batch = make_batch(seed=6)
    plain, scaled = _hybrid(1.0), _hybrid(3.0)
    torch.testing.assert_close(scaled(**batch).logits, plain(**batch).logits, rtol=1e-5, atol=1e-6)
    for (_, p_layer), (_, s_layer) in zip(sparse_layers(plain), sparse_layers(scaled)):
        assert s_layer.lora_scaling["default"] == 9 * p_layer.lora_scaling["default"]
        torch.testing.assert_close(dense_delta(s_layer), dense_delta(p_layer))

    def groups(model, low_rank_rate):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in named if "sparse_lora_" not in n], "lr": 1e-2},
            {"params": [p for n, p in named if "sparse_lora_" in n], "lr": low_rank_rate},
        ]

    _train(plain, torch.optim.Adam(groups(plain, 3e-2), eps=1e-12))  # the term at 3x the values' rate
    _train(scaled, torch.optim.Adam(groups(scaled, 1e-2), eps=1e-12))  # one rate: the ratio does it
    for (name, p_layer), (_, s_layer) in zip(sparse_layers(plain), sparse_layers(scaled)):
        assert p_layer.sparse_lora_B["default"].abs().sum() > 0
        torch.testing.assert_close(dense_delta(s_layer), dense_delta(p_layer), rtol=1e-4, atol=1e-6, msg=name)
    one_rate = _hybrid(1.0)
    _train(one_rate, torch.optim.Adam(groups(one_rate, 1e-2), eps=1e-12))
    moved = [
        (dense_delta(a) - dense_delta(b)).abs().max()
        for (_, a), (_, b) in zip(sparse_layers(one_rate), sparse_layers(plain))
    ]
    assert max(moved) > 1e-3  # without the ratio the same single rate trains another term


def test_a_low_rank_lr_ratio_survives_save_load_merge_and_weighted_adapters(tmp_path):
    model = _hybrid(3.0, init_weights=True)
    _train(model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2))
    model.eval()
    batch = make_batch(seed=9)
    trained = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].low_rank_lr_ratio == 3.0
    torch.testing.assert_close(loaded(**batch).logits, trained, rtol=0, atol=0)
    loaded.add_weighted_adapter(["default"], [0.5], "halved")
    assert loaded.peft_config["halved"].low_rank_lr_ratio == 1.0  # its factors hold the scales
    for name, layer in sparse_layers(loaded):
        torch.testing.assert_close(dense_delta(layer, "halved"), 0.5 * dense_delta(layer), rtol=1e-5, atol=1e-7)
    loaded.save_pretrained(tmp_path / "both")
    reloaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "both" / "halved", adapter_name="halved")
    for (name, a), (_, b) in zip(sparse_layers(reloaded), sparse_layers(loaded)):
        torch.testing.assert_close(dense_delta(a, "halved"), dense_delta(b, "halved"), rtol=0, atol=0, msg=name)
    merged = loaded.merge_and_unload(adapter_names=["default"])
    torch.testing.assert_close(merged(**batch).logits, trained, rtol=1e-5, atol=1e-5)


def test_4bit_hybrid_matches_the_reference_and_saves_loads_and_merges(tmp_path):
    quantised = quantised_tiny_llama(tmp_path / "base", **four_bit())
    # every 4-bit layer adapted: the non-adapted ones would run bitsandbytes' own CPU forward, which is not the
    # reference's decode on every CPU (tests/bnb_defects.py)
    model = get_peft_model(
        quantised, SparseConfig(target_modules="all-linear", density=0.05, r=2, lora_alpha=4, init_weights=False)
    )
    randomise_values(model)
    batch = make_batch(seed=5)
    reference = reference_logits(model, reference_dequantised_copy(model.get_base_model()), batch)
    model.train()  # the training-mode path; eval-mode bitsandbytes may repack weights on some CPUs
    out = model(**batch, labels=batch["input_ids"])
    torch.testing.assert_close(out.logits.double(), reference, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert all(layer.sparse_lora_A["default"].grad.abs().sum() > 0 for _, layer in sparse_layers(model))
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(quantised_tiny_llama(tmp_path / "base", **four_bit()), tmp_path / "adapter")
    loaded.train()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
    # Merging re-quantises W0 + sparse + low-rank delta (one 4-bit rounding); unmerge restores the original bytes.
    originals = {
        name: (layer.get_base_layer().weight.data.clone(), decoded(layer)) for name, layer in sparse_layers(loaded)
    }
    sparse_bnb._requantisation_warned = False
    with pytest.warns(UserWarning, match="re-quantises"):
        loaded.merge_adapter()
    for name, layer in sparse_layers(loaded):
        target = originals[name][1] + dense_delta(layer)
        assert_within_one_quantisation_step(decoded(layer), target, "nf4", name)
        assert not torch.equal(decoded(layer), originals[name][1]), name  # the delta really went in
    loaded.unmerge_adapter()
    for name, layer in sparse_layers(loaded):
        assert torch.equal(layer.get_base_layer().weight.data, originals[name][0]), name


def test_salience_selection_and_spiel_leave_the_low_rank_term_training():
    """The mask machinery (salience selection, SpIEL prune-and-regrow) handles the entries; the low-rank factors
    keep their parameters and keep training beside them."""
    from peft_sparse import SpIEL, select_mask

    model = get_peft_model(
        tiny_llama(),
        SparseConfig(
            target_modules="all-linear", density=0.05, r=2, update="spiel", update_interval=2, accumulation_steps=1
        ),
    )
    batches = [{**make_batch(seed=i), "labels": make_batch(seed=i)["input_ids"]} for i in range(3)]
    select_mask(model, batches)
    layers = dict(sparse_layers(model))
    factors = {name: layer.sparse_lora_A["default"] for name, layer in layers.items()}
    selected = {name: layer.sparse_indices["default"].clone() for name, layer in layers.items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=6)
    model.train()
    for step in range(4):
        model(**batches[step % 3]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        spiel.step()
    assert any(not torch.equal(layer.sparse_indices["default"], selected[name]) for name, layer in layers.items())
    for name, layer in layers.items():
        assert layer.sparse_lora_A["default"] is factors[name]
        assert layer.sparse_lora_B["default"].abs().sum() > 0, name


def test_an_adapter_saved_before_the_ratio_existed_loads_with_ratio_one(tmp_path):
    import json

    model = _hybrid(1.0)
    model.eval()
    batch = make_batch(seed=9)
    expected = model(**batch).logits.detach()
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["low_rank_lr_ratio"]  # as 0.1.0 wrote it
    config_file.write_text(json.dumps(saved))
    assert SparseConfig.check_kwargs(**saved)["low_rank_lr_ratio"] == 1.0  # not the class default, whatever it is
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.peft_config["default"].low_rank_lr_ratio == 1.0
    torch.testing.assert_close(loaded(**batch).logits, expected, rtol=0, atol=0)
