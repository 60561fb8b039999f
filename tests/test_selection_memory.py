"""Selection in bounded memory: layer groups under ``max_memory`` and the running top-k choose exactly the
mask that one pass over all layers and one top-k over every score choose, tie-breaks included.

The judge is the whole-model path: :func:`salience_scores` (every layer's score at once) ranked by
:func:`reference_top_k` (the plain definition of one top-k over all of them) with :func:`tie_generators`, which is
how ``select_mask`` chose before it learned to bound its memory.
"""

from __future__ import annotations

import random
import weakref
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama

from peft_sparse import SparseConfig, select_mask, update_mask
from peft_sparse.selection.select import salience_scores, tie_generators
from peft_sparse.selection.topk import RunningTopK, reference_top_k, select_top_k
from peft_sparse.tuner.lookup import resolve_adapter, sparse_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
GROUPED_METRICS = [
    "gradient",
    "relative_gradient",
    "snip",
    "force",
    "taylor_fo",
    "fisher",
    "magnitude",
    "random",
    "synflow",
]


def _batches(seed: int = 0, count: int = 2):
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": ids, "labels": ids}
        for ids in (torch.randint(0, VOCAB, (2, 7), generator=gen) for _ in range(count))
    ]


def _selected(model):
    return {name: layer.sparse_indices["default"].long() for name, layer in sparse_layers(model.base_model, "default")}


def _model(**config):
    return get_peft_model(tiny_llama(seed=21), SparseConfig(target_modules=TARGETS, **config))


def _whole_model_choice(model, batches, budget: str):
    """The mask by the whole-model path: every score at once, one exact top-k (global) or one per layer. The layers
    are named from the module select_mask names them from (the tie-breaks are seeded by the name: on CPUs where a
    metric ties, a name from another root gave other tie-breaks and another mask)."""
    root, adapter, config = resolve_adapter(model, None, "test")
    layers = sparse_layers(root, adapter)
    scores = salience_scores(model, batches)
    ties = tie_generators(config, layers)
    counts = [layer.sparse_indices[adapter].numel() for _, layer in layers]
    ordered = list(scores.values())  # in layer order
    if budget == "global":
        chosen = reference_top_k(ordered, sum(counts), ties)
    else:
        chosen = [reference_top_k([s], c, [g])[0] for s, c, g in zip(ordered, counts, ties)]
    names = [name for name, _ in sparse_layers(model.base_model, adapter)]  # the keys _selected uses, same order
    return dict(zip(names, chosen, strict=True))


# ---------------------------------------------------------------------------------------------------------------
# RunningTopK and select_top_k against the reference top-k
# ---------------------------------------------------------------------------------------------------------------


def _generators(count: int, seed: int):
    return [torch.Generator().manual_seed(1000 * seed + i) for i in range(count)]


def _random_layers(rng: random.Random, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    levels = rng.choice([2, 3, 7, 10**6])  # few levels: ties everywhere, also across layers and at the boundary
    shapes = [(rng.randint(1, 4), rng.randint(1, 30)) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.3:
        shapes[rng.randrange(len(shapes))] = (0, 5)  # an empty layer
    layers = []
    for shape in shapes:
        scores = torch.randint(0, levels, shape, generator=gen).float()
        if rng.random() < 0.4:
            scores *= torch.randn(shape, generator=gen).sign()  # negative scores and -0.0
        flat = scores.view(-1)
        if flat.numel() and rng.random() < 0.2:
            flat[rng.randrange(flat.numel())] = float("nan")
        if flat.numel() and rng.random() < 0.2:
            flat[rng.randrange(flat.numel())] = float("inf")
        layers.append(scores)
    return layers


@pytest.mark.parametrize("seed", range(3))
def test_running_top_k_equals_one_top_k_over_everything(seed):
    rng = random.Random(seed)
    for trial in range(25):
        layers = _random_layers(rng, 100 * seed + trial)
        total = sum(s.numel() for s in layers)
        for k in sorted({0, min(1, total), total, max(total - 1, 0), rng.randint(0, total), rng.randint(0, total)}):
            expected = reference_top_k(layers, k, _generators(len(layers), trial))
            running = RunningTopK(k, _generators(len(layers), trial))
            for scores in layers:
                running.add(scores.clone(), in_place=rng.random() < 0.5)
            got = running.result()
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), (seed, trial, k)
            assert sum(c.numel() for c in got) == k
            # select_top_k (one layer at a time, as the per-layer budget and SpIEL use it, or all at once)
            copies = [scores.clone() for scores in layers]
            together = select_top_k(copies, k, _generators(len(layers), trial), in_place=True)
            assert all(torch.equal(a, b) for a, b in zip(expected, together, strict=True)), (seed, trial, k)
            for scores, generator in zip(layers, _generators(len(layers), trial)):
                own = min(k, scores.numel())
                alone = select_top_k([scores], own, [generator])[0]
                assert torch.equal(alone, reference_top_k([scores], own, [generator])[0]), (seed, trial, own)


def test_running_top_k_holds_about_k_entries_and_trims_ties_exactly():
    gen = torch.Generator().manual_seed(0)
    # 40 layers of 2000 scores on 5 levels: the boundary ties span many layers and are trimmed again and again.
    layers = [torch.randint(0, 5, (2000,), generator=gen).float() for _ in range(40)]
    k = 3000
    running = RunningTopK(k, _generators(40, 1))
    for scores in layers:
        running.add(scores)
        assert running.held <= k + k // 4 + 2000
    assert [c.tolist() for c in running.result()] == [
        c.tolist() for c in reference_top_k(layers, k, _generators(40, 1))
    ]
    # never a key per score seen (80,000 of them): at most 1.25 k candidates, one arriving layer, and the priorities
    # of the ties kept at the boundary (8 bytes each, at most k)
    assert running.peak_bytes <= 8 * (k + k // 4 + 2000) + 8 * k


def test_running_top_k_refuses_misuse():
    running = RunningTopK(5, _generators(2, 0))
    running.add(torch.ones(3))
    with pytest.raises(ValueError, match="1 layers added, 2 generators"):
        running.result()
    running.add(torch.ones(1))
    with pytest.raises(ValueError, match="more layers added"):
        running.add(torch.ones(1))
    with pytest.raises(ValueError, match="k=5 must lie in"):
        running.result()
    with pytest.raises(ValueError, match="k must be a non-negative int"):
        RunningTopK(-1, [])


# ---------------------------------------------------------------------------------------------------------------
# select_mask under a budget: the same mask, in bounded memory
# ---------------------------------------------------------------------------------------------------------------


def _smallest_budget(**config) -> int:
    with pytest.raises(ValueError, match="the smallest workable value is") as refused:
        select_mask(_model(**config), _batches(), max_memory=1)
    return int(str(refused.value).rsplit(" ", 1)[-1])


@pytest.mark.parametrize("budget", ["global", "local"])
@pytest.mark.parametrize("metric", GROUPED_METRICS)
def test_a_tight_budget_chooses_the_whole_model_mask(metric, budget):
    config = {"selection": metric, "budget": budget, "density": 0.04}
    expected = _whole_model_choice(_model(**config), _batches(), budget)
    smallest = _smallest_budget(**config)
    model = _model(**config)
    report = select_mask(model, _batches(), max_memory=smallest)
    selected = _selected(model)
    assert set(selected) == set(expected)
    for name in expected:
        assert torch.equal(selected[name], expected[name]), name
    layers = len(expected)
    if metric in ("magnitude", "random"):
        assert report.passes == 0 and report.num_batches == 0
    else:  # the tightest budget fits the largest layer alone: several passes over the data
        assert 1 < report.passes <= layers and report.num_batches == (0 if metric == "synflow" else 2)
    assert report.max_memory == smallest and 0 < report.extra_memory_bytes <= smallest


def test_grasp_is_one_group_and_refuses_a_budget_or_grouping_it_cannot_honour():
    model = _model(selection="grasp")
    with pytest.raises(ValueError, match="grasp.*cannot be split into groups"):
        select_mask(model, _batches(), layers_per_pass=2)
    with pytest.raises(ValueError, match="GRaSP's accumulators for all .* the smallest workable value is"):
        select_mask(model, _batches(), max_memory=10_000)
    report = select_mask(model, _batches())
    assert report.passes == 2  # the gradient, then the perturbed gradient, every layer at once


def test_the_budget_bounds_what_selection_holds():
    def run(max_memory):
        model = _model(selection="gradient", density=0.02)
        return select_mask(model, _batches(), max_memory=max_memory), _selected(model)

    smallest = _smallest_budget(selection="gradient", density=0.02)
    roomy, roomy_mask = run(2**40)
    reports = [(run(budget)) for budget in (smallest, 2 * smallest)]
    total_weights = sum(layer.num_weight_entries for _, layer in sparse_layers(_model().base_model, "default"))
    assert roomy.passes == 1 and roomy.extra_memory_bytes >= 4 * total_weights  # every accumulator at once
    for report, mask in reports:
        assert all(torch.equal(mask[n], roomy_mask[n]) for n in roomy_mask)
        assert report.extra_memory_bytes <= report.max_memory < roomy.extra_memory_bytes
    assert reports[0][0].passes > reports[1][0].passes > 1


def test_the_config_field_sets_the_budget_and_bad_budgets_are_refused():
    smallest = _smallest_budget(selection="gradient")
    model = _model(selection="gradient", selection_max_memory=smallest)
    report = select_mask(model, _batches())
    assert report.max_memory == smallest and 1 < report.passes <= len(_selected(model))
    assert select_mask(_model(selection="gradient"), _batches(), max_memory=2**40).passes == 1
    for bad, error in [(0, ValueError), (-5, ValueError), (1.5e9, TypeError), (True, TypeError), ("1GB", TypeError)]:
        with pytest.raises(error, match=f"SparseConfig.selection_max_memory must be .*{bad!r}"):
            SparseConfig(target_modules=TARGETS, selection_max_memory=bad)
    for bad in (0, 2.5, "big"):
        with pytest.raises(ValueError, match=f"max_memory must be a positive int .*{bad!r}"):
            select_mask(_model(), _batches(), max_memory=bad)


def test_every_pass_sees_the_same_batches_from_a_shuffling_loader():
    """Several passes over the data (one per layer group) must rank one set of batches: a shuffling DataLoader
    re-iterated per group would give each group other batches, and a mask no single pass chooses."""
    rows = [
        {"input_ids": ids, "labels": ids}
        for ids in torch.randint(0, VOCAB, (16, 7), generator=torch.Generator().manual_seed(3))
    ]

    def loader():
        return torch.utils.data.DataLoader(
            rows, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(5)
        )

    one_pass = _model(selection="gradient")
    select_mask(one_pass, loader(), num_batches=3, max_memory=2**40)
    grouped = _model(selection="gradient")
    report = select_mask(grouped, loader(), num_batches=3, layers_per_pass=1)
    assert report.passes > 1
    expected, got = _selected(one_pass), _selected(grouped)
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def test_no_more_gradient_accumulators_live_at_once_than_one_group(monkeypatch):
    from peft_sparse.selection import salience

    live, most = set(), [0]
    original = salience.GradientProbe.__init__

    def tracking(self, *args, **kwargs):
        original(self, *args, **kwargs)
        live.add(id(self))
        weakref.finalize(self, live.discard, id(self))
        most[0] = max(most[0], len(live))

    monkeypatch.setattr(salience.GradientProbe, "__init__", tracking)
    select_mask(_model(selection="gradient"), _batches(), layers_per_pass=2)
    assert most[0] == 2


def test_dynamic_updates_under_a_budget_move_the_same_entries():
    def run(**kwargs):
        model = _model(selection="gradient", update="dynamic", density=0.05)
        select_mask(model, _batches())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
        for batch in _batches(seed=1):
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        report = update_mask(model, _batches(seed=2), optimizer=optimizer, **kwargs)
        return report, _selected(model)

    roomy, expected = run(max_memory=2**40)
    tight, got = run(layers_per_pass=1)
    assert roomy.passes == 1 and tight.passes == len(expected) + 1 and tight.replayed and roomy.total > 0
    assert roomy.per_layer == tight.per_layer
    assert all(torch.equal(expected[n], got[n]) for n in expected)


def _free_memory(monkeypatch, free: int | None) -> None:
    from peft_sparse.selection import select

    monkeypatch.setattr(select, "free_memory_bytes", lambda device: free)


def test_the_default_budget_is_one_pass_wherever_the_free_memory_allows(monkeypatch, caplog):
    from peft_sparse.selection import select

    exact = _model(selection="gradient")
    select_mask(exact, _batches(), max_memory=2**40)
    _free_memory(monkeypatch, 2**40)
    roomy_model = _model(selection="gradient")
    with caplog.at_level("WARNING", logger="peft_sparse.selection.select"):
        roomy = select_mask(roomy_model, _batches())
    assert roomy.passes == 1 and not caplog.records
    # it takes what one pass needs, not half of the free memory
    assert roomy.max_memory < 2**30 and roomy.max_memory >= roomy.extra_memory_bytes
    assert all(torch.equal(_selected(exact)[n], _selected(roomy_model)[n]) for n in _selected(exact))
    # unknown free memory: the floor, as before
    _free_memory(monkeypatch, None)
    model = _model(selection="gradient")
    counts = [layer.sparse_indices["default"].numel() for _, layer in sparse_layers(model.base_model, "default")]
    floor = select.default_max_memory(
        sparse_layers(model.base_model, "default"), select.METRICS["gradient"], torch.float32, counts, one_top_k=False
    )
    assert select_mask(model, _batches()).max_memory == floor


def test_where_memory_is_tight_the_default_splits_and_says_what_it_costs(monkeypatch, caplog):
    from peft_sparse.selection import select

    _free_memory(monkeypatch, 1)  # nothing free: the floor, which splits this model's layers into groups
    monkeypatch.setattr(select, "MIN_DEFAULT_ACCUMULATOR_BYTES", 1)
    expected = _model(selection="gradient")
    select_mask(expected, _batches(), max_memory=2**40)
    model = _model(selection="gradient")
    with caplog.at_level("WARNING", logger="peft_sparse.selection.select"):
        report = select_mask(model, _batches())
    assert report.passes > 1
    (record,) = caplog.records
    message = record.getMessage()
    groups = report.passes - 1 if report.replayed else report.passes
    # the replay's cost as the report counts it (less the measured batch), blocks split between groups included
    replayed = report.forward_backward_passes - (report.pass_memory_bytes is not None)
    cost = (
        f"about {replayed} where their decoder blocks can be replayed, up to {2 * groups} where not"
        if groups >= 3
        else f"up to {2 * groups}"
    )
    assert f"scored in {groups} groups over 2 batches ({cost} forward+backward passes instead of 2)" in message, (
        message
    )
    assert "SparseConfig.selection_max_memory=" in message and "one pass" in message
    needed = int(message.split("selection_max_memory=")[1].split()[0])
    caplog.clear()
    assert select_mask(_model(selection="gradient", selection_max_memory=needed), _batches()).passes == 1
    assert not caplog.records  # a budget the user chose is not second-guessed
    assert all(torch.equal(_selected(expected)[n], _selected(model)[n]) for n in _selected(expected))


def test_where_memory_is_tight_the_budget_is_what_is_free_less_a_measured_pass(monkeypatch):
    """One pass does not fit half of what is free: a salience batch's forward and backward are measured first (one
    batch more), and the budget is what is free less that and a margin (not half of it), the same mask."""
    from peft_sparse.selection import select

    monkeypatch.setattr(select, "MIN_DEFAULT_ACCUMULATOR_BYTES", 1)  # a floor below one pass of this tiny model
    exact = _model(selection="gradient")
    _free_memory(monkeypatch, 2**40)
    one_pass = select_mask(exact, _batches()).max_memory  # roomy: what one pass needs
    _free_memory(monkeypatch, one_pass)
    measured = []
    monkeypatch.setattr(select, "pass_memory_bytes", lambda *args: measured.append(args) or one_pass // 5)
    model = _model(selection="gradient")
    report = select_mask(model, _batches())
    assert len(measured) == 1 and report.pass_memory_bytes == one_pass // 5
    assert report.max_memory == int((1 - select.TIGHT_MEMORY_MARGIN) * one_pass) - one_pass // 5
    rounds = report.replay_recordings + 1 if report.replayed else report.passes
    assert report.passes > 1 and report.forward_backward_passes == rounds * 2 + 1  # two batches, and the measured one
    assert all(torch.equal(_selected(exact)[n], _selected(model)[n]) for n in _selected(exact))
    # where one pass fits half of what is free nothing is measured
    _free_memory(monkeypatch, 4 * one_pass)
    assert select_mask(_model(selection="gradient"), _batches()).pass_memory_bytes is None and len(measured) == 1


def test_a_pass_measures_what_its_forward_and_backward_hold_and_leaves_the_gradients():
    """``pass_memory_bytes`` on a CPU: a loss that holds 64 MiB at once is measured at about that much; every
    parameter's ``.grad`` is as it was."""
    from peft_sparse.selection.passes import pass_memory_bytes

    if not Path("/proc/self/status").exists():
        pytest.skip("the resident set is read from /proc (Linux)")

    def heavy_loss(outputs, batch):
        held = torch.ones(16 * 2**20)  # 64 MiB, above any malloc threshold: fresh pages
        return outputs.logits.float().mean() + 0 * held[0]

    model = _model(selection="gradient")
    layers = sparse_layers(model.base_model, "default")
    before = {name: p.grad for name, p in model.named_parameters()}
    measured = pass_memory_bytes(model, layers, "default", _batches()[0], heavy_loss)
    assert measured is not None and measured >= 60 * 2**20  # the resident set moves by a page here and there
    assert all(p.grad is before[name] for name, p in model.named_parameters())


def test_bfloat16_accumulators_halve_the_memory_and_the_passes_and_keep_the_mask_close():
    """``selection_accumulation_dtype="bfloat16"``: half the accumulator bytes, so a budget that splits the float32
    accumulators into groups holds the bf16 ones in one pass, and a mask close to the float32 one (the sums round to
    bf16: only near-ties may swap)."""
    batches = _batches(count=4)
    layers = sparse_layers(_model().base_model, "default")
    total = sum(layer.num_weight_entries for _, layer in layers)
    roomy = select_mask(_model(selection="gradient", density=0.05), batches, max_memory=2**40)
    assert roomy.passes == 1 and roomy.extra_memory_bytes >= 4 * total
    budget = int(0.7 * roomy.extra_memory_bytes)
    full = _model(selection="gradient", density=0.05)
    half = _model(selection="gradient", density=0.05, selection_accumulation_dtype="bfloat16")
    full_report, half_report = (
        select_mask(full, batches, max_memory=budget),
        select_mask(half, batches, max_memory=budget),
    )
    assert full_report.passes >= 2 and half_report.passes == 1
    assert 2 * total <= half_report.extra_memory_bytes <= budget
    # the same mask up to near-ties
    chosen, reference = _selected(half), _selected(full)
    shared = sum(int(torch.isin(chosen[n], reference[n]).sum()) for n in reference)
    assert shared >= 0.9 * sum(t.numel() for t in reference.values())
    # select_mask's own argument wins over the config's
    again = _model(selection="gradient", density=0.05, selection_accumulation_dtype="bfloat16")
    select_mask(again, batches, accumulation_dtype=torch.float32)
    assert all(torch.equal(_selected(again)[n], reference[n]) for n in reference)
    with pytest.raises(ValueError, match="SparseConfig.selection_accumulation_dtype must be one of .*'float16'"):
        SparseConfig(target_modules=TARGETS, selection_accumulation_dtype="float16")
