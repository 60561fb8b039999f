"""Salience selection (``peft_sparse.select_mask``) against hand computations on a tiny Llama.

The reference gradients come from plain autograd on an unadapted float64 copy of the model (the weights made
trainable), so the test judges the gradient probes inside the sparse layers' backward as well as the metrics.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, make_batch, tiny_llama

from peft_sparse import SparseConfig, select_mask
from peft_sparse.selection import select_top_k
from peft_sparse.selection.topk import reference_top_k
from peft_sparse.tuner.lookup import sparse_layers

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _batches(seed: int = 0, count: int = 3):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, VOCAB, (2, 9), generator=gen)
        out.append({"input_ids": ids, "labels": ids})
    return out


def _targeted(model):
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in TARGETS
    }


def _reference_statistics(base, batches, hessian: bool = False):
    """Dense G = sum_b g_b, F = sum_b g_b**2 and (optionally) exact H G, by plain autograd on the base model."""
    model = copy.deepcopy(base)
    if hessian:
        model.set_attn_implementation("eager")  # SDPA on CPU has no double backward
    layers = _targeted(model)
    weights = [m.weight for m in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    grads = [torch.zeros_like(w) for w in weights]
    squares = [torch.zeros_like(w) for w in weights]
    for batch in batches:
        g = torch.autograd.grad(model(**batch).loss, weights)
        for total, square, gb in zip(grads, squares, g):
            total += gb
            square += gb * gb
    hvp = None
    if hessian:
        hvp = [torch.zeros_like(w) for w in weights]
        for batch in batches:
            g = torch.autograd.grad(model(**batch).loss, weights, create_graph=True)
            dot = sum((gb * G).sum() for gb, G in zip(g, grads))
            for total, hb in zip(hvp, torch.autograd.grad(dot, weights)):
                total += hb
    names = list(layers)
    stats = {
        name: {"weight": w.detach(), "grad": G, "grad_square": F}
        for name, w, G, F in zip(names, weights, grads, squares)
    }
    if hvp is not None:
        for name, h in zip(names, hvp):
            stats[name]["hessian_grad"] = h
    return stats


EXPECTED = {
    "magnitude": lambda s: s["weight"].abs(),
    "gradient": lambda s: s["grad"].abs(),
    "relative_gradient": lambda s: (
        s["grad"].abs()
        / (s["grad"].square().mean(1, keepdim=True).sqrt() * s["grad"].square().mean(0, keepdim=True).sqrt())
    ),
    "snip": lambda s: (s["grad"] * s["weight"]).abs(),
    "force": lambda s: -(s["grad"] * s["weight"]),
    "taylor_fo": lambda s: (s["grad"] * s["weight"]).square(),
    "fisher": lambda s: s["grad_square"],
    "grasp": lambda s: -(s["hessian_grad"] * s["weight"]),
}


def _selected(model, adapter="default"):
    return {
        name.replace("base_model.model.", ""): module.sparse_indices[adapter].long()
        for name, module in model.named_modules()
        if hasattr(module, "sparse_indices") and adapter in module.sparse_indices
    }


def _expected_local(stats, metric, density):
    out = {}
    for name, s in stats.items():
        score = EXPECTED[metric](s).reshape(-1)
        k = int(density * score.numel() + 0.5)
        out[name] = score.topk(k).indices.sort().values
    return out


@pytest.mark.parametrize("metric", sorted(EXPECTED))
def test_each_metric_matches_a_hand_computation(metric):
    base = tiny_llama(seed=3, dtype=torch.float64)
    batches = _batches()
    stats = _reference_statistics(base, batches, hessian=metric == "grasp")
    model = get_peft_model(
        copy.deepcopy(base), SparseConfig(target_modules=TARGETS, density=0.05, budget="local", selection=metric)
    )
    report = select_mask(model, batches, accumulation_dtype=torch.float64)
    selected = _selected(model)
    expected = _expected_local(stats, metric, 0.05)
    assert set(selected) == set(expected)
    for name in expected:
        assert selected[name].numel() == expected[name].numel() == report.per_layer[name]
        if metric == "grasp":
            # H G is a finite difference here (exact double backward in the reference): allow a few boundary swaps.
            overlap = len(set(selected[name].tolist()) & set(expected[name].tolist()))
            assert overlap >= 0.9 * expected[name].numel(), (name, overlap, expected[name].numel())
        else:
            assert torch.equal(selected[name], expected[name]), name
    assert report.num_batches == (0 if metric == "magnitude" else 3)


def test_synflow_matches_a_hand_computation_and_restores_the_model():
    base = tiny_llama(seed=12, dtype=torch.float64)
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for p in reference.parameters():
            p.abs_()
    layers = _targeted(reference)
    weights = [m.weight for m in layers.values()]
    for w in weights:
        w.requires_grad_(True)
    ones = torch.ones(1, 1, reference.config.hidden_size, dtype=torch.float64)
    grads = torch.autograd.grad(reference(inputs_embeds=ones).logits.sum(), weights)
    expected = {name: (g * w).reshape(-1) for name, g, w in zip(layers, grads, weights)}

    model = get_peft_model(
        copy.deepcopy(base), SparseConfig(target_modules=TARGETS, density=0.05, budget="local", selection="synflow")
    )
    model.train()
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    select_mask(model, accumulation_dtype=torch.float64)
    selected = _selected(model)
    for name, score in expected.items():
        k = int(0.05 * score.numel() + 0.5)
        # A valid top-k, judged by value: with one token, attention's softmax is 1 whatever the query, so q_proj's
        # salience is exactly zero everywhere and any k entries are a top-k. Comparing against torch.topk's indices
        # would test how its kernel orders ties, which differs between CPUs (it failed on AVX512 machines).
        kth_largest = score.topk(k).values[-1]
        assert selected[name].numel() == k == selected[name].unique().numel(), name
        assert bool((score[selected[name]] >= kth_largest).all()), name
    assert any(
        bool(score.topk(k + 1).values[-2] > score.topk(k + 1).values[-1])
        for score in expected.values()
        for k in [int(0.05 * score.numel() + 0.5)]
    )  # some layer's top-k is unique, so the check has teeth
    state_after = model.state_dict()
    for key, value in state_before.items():
        if "sparse_" not in key:  # the base model comes back bit for bit (signs restored)
            assert torch.equal(state_after[key], value), key
    assert model.training


def test_global_budget_equals_top_k_over_the_concatenation():
    base = tiny_llama(seed=4, dtype=torch.float64)
    batches = _batches(1)
    stats = _reference_statistics(base, batches)
    model = get_peft_model(
        copy.deepcopy(base),
        SparseConfig(target_modules=TARGETS, num_tunable_weights=300, selection="snip", budget="global"),
    )
    select_mask(model, batches, accumulation_dtype=torch.float64)
    names = list(stats)
    scores = [EXPECTED["snip"](stats[n]).reshape(-1) for n in names]
    top = torch.cat(scores).topk(300).indices
    offsets = torch.tensor([0] + [s.numel() for s in scores]).cumsum(0)
    selected = _selected(model)
    for i, name in enumerate(names):
        mine = top[(top >= offsets[i]) & (top < offsets[i + 1])] - offsets[i]
        assert torch.equal(selected[name], mine.sort().values), name
    assert sum(v.numel() for v in selected.values()) == 300


@pytest.mark.parametrize("density", [0.013, 0.2])
def test_local_budgets_are_exact_and_values_reset(density, capsys):
    model = get_peft_model(
        tiny_llama(seed=5), SparseConfig(target_modules=TARGETS, density=density, budget="local", selection="gradient")
    )
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "sparse_values"):
                module.sparse_values["default"].fill_(0.5)
    select_mask(model, _batches(), num_batches=2, reset_values=True)
    total = 0
    for module in model.modules():
        if hasattr(module, "sparse_values"):
            indices, values = module.sparse_indices["default"], module.sparse_values["default"]
            assert indices.numel() == int(density * module.num_weight_entries + 0.5)
            assert bool((indices[1:] > indices[:-1]).all())
            assert values.requires_grad and torch.count_nonzero(values) == 0
            total += indices.numel()
    model.print_trainable_parameters()
    assert f"trainable params: {total:,}" in capsys.readouterr().out


def test_selection_leaves_no_gradients_and_is_reproducible():
    config = SparseConfig(target_modules=TARGETS, density=0.05, selection="fisher", seed=7)
    first = get_peft_model(tiny_llama(seed=6), config)
    select_mask(first, _batches())
    assert all(p.grad is None for p in first.parameters())
    second = get_peft_model(tiny_llama(seed=6), copy.deepcopy(config))
    report = select_mask(second, _batches(), layers_per_pass=1)
    for name, indices in _selected(first).items():
        assert torch.equal(indices, _selected(second)[name])
    assert report.extra_memory_bytes > 0


def test_layer_groups_bound_the_accumulator_memory():
    def run(**kwargs):
        model = get_peft_model(tiny_llama(seed=8), SparseConfig(target_modules=TARGETS, selection="gradient"))
        return select_mask(model, _batches(), **kwargs), _selected(model)

    all_at_once, selected_all = run(max_memory=2**40)
    one_by_one, selected_one = run(layers_per_pass=1)
    assert all(torch.equal(selected_all[n], selected_one[n]) for n in selected_all)
    assert one_by_one.extra_memory_bytes < all_at_once.extra_memory_bytes
    # the groups are replayed from recorded block boundaries (a recording pass, then one per layer): host memory that
    # the report counts apart. Per block (2 here): its input and its output's gradient for every batch's tokens, and
    # the first batch's output (hidden 32, fp32)
    batches = _batches()
    tokens, first = sum(b["input_ids"].numel() for b in batches), batches[0]["input_ids"].numel()
    assert one_by_one.replayed and one_by_one.replay_bytes == 2 * (2 * tokens + first) * 32 * 4
    assert (all_at_once.passes, one_by_one.passes) == (1, len(selected_all) + 1)


def test_random_selection_depends_on_the_seed_only():
    def run(seed):
        model = get_peft_model(tiny_llama(seed=9), SparseConfig(target_modules=TARGETS, selection="random", seed=seed))
        select_mask(model)
        return _selected(model)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_batches_may_be_batch_encodings_and_leave_the_data_untouched():
    from transformers import BatchEncoding

    data = [BatchEncoding(b) for b in _batches()]
    model = get_peft_model(tiny_llama(seed=10), SparseConfig(target_modules=TARGETS, selection="gradient"))
    report = select_mask(model, data)
    assert report.num_batches == 3 and report.total == sum(_selected(model)[n].numel() for n in _selected(model))


def test_bad_input_raises():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=TARGETS, selection="gradient"))
    with pytest.raises(ValueError, match="needs `data`"):
        select_mask(model)
    with pytest.raises(ValueError, match="yielded no batch"):
        select_mask(model, [])
    # a TensorDataset's tuples: named in one line, before any pass (they used to fail inside the embedding)
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, ids), batch_size=2)
    with pytest.raises(TypeError, match=r"salience batch 0 \(0-based\) is a list; batches must be dicts"):
        select_mask(model, loader)
    with pytest.raises(TypeError, match=r"salience batch 1 \(0-based\) is a tuple"):
        select_mask(model, [_batches()[0], (ids, ids)])
    with pytest.raises(ValueError, match="num_batches must be a positive int"):
        select_mask(model, _batches(), num_batches=0)
    with pytest.raises(ValueError, match="adapter_name 'nope' does not exist"):
        select_mask(model, _batches(), adapter_name="nope")
    with pytest.raises(TypeError, match="expected a peft model"):
        select_mask(torch.nn.Linear(2, 2), _batches())


# ---------------------------------------------------------------------------------------------------------------
# select_top_k
# ---------------------------------------------------------------------------------------------------------------


def _gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("top_k", [select_top_k, reference_top_k])
@pytest.mark.parametrize("k", [0, 1, 37, 500, 611])
def test_top_k_without_ties_equals_sorting_the_concatenation(k, top_k):
    gen = torch.Generator().manual_seed(k)
    scores = [torch.randn(shape, generator=gen) for shape in [(7, 13), (1, 20), (50, 10)]]
    chosen = top_k(scores, k, _gens(3))
    flat = torch.cat([s.reshape(-1) for s in scores])
    expected = set(flat.topk(k).indices.tolist())
    offsets = [0, 91, 111]
    got = {offset + int(i) for offset, c in zip(offsets, chosen) for i in c}
    assert got == expected and sum(c.numel() for c in chosen) == k
    assert all(torch.equal(c, c.sort().values) and c.dtype == torch.int64 for c in chosen)


def test_top_k_ties_are_exact_and_seeded():
    scores = [torch.tensor([3.0, 1.0, 1.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 5.0, float("nan"), -0.0, 0.0])]
    picks = [select_top_k(scores, 4, _gens(2, seed)) for seed in range(8)]
    for chosen in picks:
        assert sum(c.numel() for c in chosen) == 4
        assert 0 in chosen[0].tolist() and 2 in chosen[1].tolist()  # the two values above the tied 1.0s
        tied = [(0, i) for i in chosen[0].tolist() if i in (1, 2, 3)] + [
            (1, i) for i in chosen[1].tolist() if i in (0, 1)
        ]
        assert len(tied) == 2
    assert [c.tolist() for c in select_top_k(scores, 4, _gens(2, 3))] == [c.tolist() for c in picks[3]]
    assert len({tuple(map(tuple, (c.tolist() for c in p))) for p in picks}) > 1  # the seed decides among ties
    everything = select_top_k(scores, 11, _gens(2))
    assert [c.tolist() for c in everything] == [list(range(5)), list(range(6))]
    with pytest.raises(ValueError, match="k=12"):
        select_top_k(scores, 12, _gens(2))
    with pytest.raises(ValueError, match="2 score tensors but 1 generators"):
        select_top_k(scores, 3, _gens(1))


# ---------------------------------------------------------------------------------------------------------------
# dynamic updates
# ---------------------------------------------------------------------------------------------------------------


def _trained_dynamic_model(selection="gradient"):
    from peft_sparse import update_mask  # noqa: F401  (the public name)

    model = get_peft_model(
        tiny_llama(seed=11), SparseConfig(target_modules=TARGETS, density=0.05, selection=selection, update="dynamic")
    )
    batches = _batches(2)
    select_mask(model, batches)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for batch in batches * 2:
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer, batches


def _moment(optimizer, layer) -> torch.Tensor:
    # a layer the global budget left empty is frozen and out of the optimizer: no state
    return optimizer.state[layer.sparse_values["default"]].get("exp_avg", torch.zeros(0)).clone()


def test_dynamic_update_keeps_the_function_and_resets_only_changed_state(tmp_path):
    from peft_sparse import update_mask
    from peft_sparse.tuner.layer import SparseLayer

    model, optimizer, batches = _trained_dynamic_model()
    ids = batches[0]["input_ids"]
    before = model(input_ids=ids).logits.detach()
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    old = [
        (
            m.sparse_indices["default"].long().clone(),
            m.sparse_values["default"].detach().clone(),
            _moment(optimizer, m),
        )
        for m in layers
    ]

    # new batches move the ranking
    report = update_mask(model, _batches(5), optimizer=optimizer)

    assert torch.equal(model(input_ids=ids).logits.detach(), before)
    assert sum(report.per_layer.values()) > 0
    residual_total = 0
    for layer, (old_indices, old_values, old_moment) in zip(layers, old):
        new_indices = layer.sparse_indices["default"].long()
        assert new_indices.numel() == old_indices.numel()  # k fixed per layer
        moment = _moment(optimizer, layer)
        for position, index in enumerate(new_indices.tolist()):
            hits = (old_indices == index).nonzero()
            if hits.numel():
                assert moment[position] == old_moment[hits[0, 0]]
                assert layer.sparse_values["default"][position] == old_values[hits[0, 0]]
            else:
                assert moment[position] == 0
        residual = layer.sparse_residual_indices["default"]
        assert not set(residual.tolist()) & set(new_indices.tolist())  # residual never overlaps trainable entries
        residual_total += residual.numel()
    assert residual_total > 0

    # training goes on, and what was moved to the residual is saved, reloaded and merged with the rest
    model(**batches[0]).loss.backward()
    optimizer.step()
    after = model(input_ids=ids).logits.detach()
    model.save_pretrained(tmp_path)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_llama(seed=11), tmp_path)
    torch.testing.assert_close(reloaded(input_ids=ids).logits, after, rtol=0, atol=1e-6)
    merged = reloaded.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, after, rtol=1e-5, atol=1e-5)


def test_fresh_selection_refuses_a_model_with_residual():
    from peft_sparse import update_mask

    model, optimizer, batches = _trained_dynamic_model()
    update_mask(model, _batches(5), optimizer=optimizer)
    with pytest.raises(ValueError, match="use update_mask|Use update_mask"):
        select_mask(model, batches)


def test_relative_gradient_removes_the_row_and_column_scales_and_keeps_what_they_do_not_explain():
    from peft_sparse.selection.salience import METRICS

    score = METRICS["relative_gradient"].score
    generator = torch.Generator().manual_seed(0)
    rows, cols = torch.rand(7, 1, generator=generator) + 0.1, torch.rand(1, 5, generator=generator) + 0.1
    signs = torch.randint(0, 2, (7, 5), generator=generator) * 2.0 - 1
    rank_one = score(grad=(rows * cols * signs).double())
    torch.testing.assert_close(rank_one, torch.full_like(rank_one, rank_one[0, 0].item()))  # |G| = u vᵀ: all tie
    spiked = rows * cols * signs
    spiked[2, 3] *= 4  # one entry larger than its row and column predict ...
    spiked[0] *= 100  # ... while a whole row is 100x larger: plain |G| ranks that row first
    plain = spiked.abs().flatten().topk(5).indices
    assert (plain // 5 == 0).all()
    relative = score(grad=spiked.clone()).flatten()
    assert relative.argmax().item() == 2 * 5 + 3
    # An all-zero row or column scores zero, never NaN; the input is overwritten in place (no layer-sized temporary).
    grad = torch.randn(4, 6, generator=generator)
    grad[1] = 0
    grad[:, 4] = 0
    out = score(grad=grad)
    assert out.data_ptr() == grad.data_ptr()
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (out[:, 4] == 0).all() and (out > 0).sum() == 15


def _refusal_batches(count: int = 2, labels: bool = True) -> list[dict[str, torch.Tensor]]:
    result = []
    for seed in range(count):
        batch = make_batch(seed=seed)
        if labels:
            batch["labels"] = batch["input_ids"].clone()
        result.append(batch)
    return result


# --- salience ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("selection", ["gradient", "fisher", "snip"])
def test_non_finite_loss_in_salience_names_the_batch(bad, selection):
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05, selection=selection))
    before = [layer.sparse_indices["default"].clone() for _, layer in sparse_layers(model)]

    def loss_fn(outputs, batch):
        loss = outputs.loss
        return loss * bad if batch["input_ids"][0, 0] == _refusal_batches()[1]["input_ids"][0, 0] else loss

    with pytest.raises(ValueError, match=rf"salience batch 1 \(0-based\) is {bad}"):
        select_mask(model, _refusal_batches(3), loss_fn=loss_fn)
    after = [layer.sparse_indices["default"] for _, layer in sparse_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))  # nothing half-applied


# --- hand-written training loops -----------------------------------------------------------------------------------
def test_a_hand_built_optimizer_built_before_select_mask_trains_the_selected_entries():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj", "v_proj"], density=0.05))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    select_mask(model, _refusal_batches())
    values = [layer.sparse_values["default"] for _, layer in sparse_layers(model)]
    assert all(id(v) in held for v in values)  # the same Parameter objects, resized
    for batch in _refusal_batches(3):
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()
    assert all(v.detach().abs().sum() > 0 for v in values if v.numel())


def test_select_mask_after_training_refuses_to_zero_the_trained_values():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05))
    select_mask(model, _refusal_batches())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(**_refusal_batches(1)[0]).loss.backward()
    optimizer.step()
    trained = [layer.sparse_values["default"].detach().clone() for _, layer in sparse_layers(model)]
    with pytest.raises(ValueError, match=r"holds trained values in 2 layer\(s\).*reset_values=True"):
        select_mask(model, _refusal_batches())
    assert all(torch.equal(t, layer.sparse_values["default"]) for t, (_, layer) in zip(trained, sparse_layers(model)))
    select_mask(model, _refusal_batches(), reset_values=True)  # deliberate
    assert all(not layer.sparse_values["default"].any() for _, layer in sparse_layers(model))


def test_select_mask_accepts_fresh_init_weights_false_values_but_not_edited_ones():
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05, init_weights=False))
    probe = copy.deepcopy(model)
    select_mask(model, _refusal_batches())  # the seeded initial values are not training: nothing is lost
    with torch.no_grad():
        sparse_layers(probe)[0][1].sparse_values["default"][0] += 1.0
    with pytest.raises(ValueError, match="holds trained values in 1 layer"):
        select_mask(probe, _refusal_batches())
