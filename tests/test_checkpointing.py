"""Gradient checkpointing changes no mask decision.

DESIGN.md: "Gradient checkpointing (reentrant or not, as TRL and peft's QLoRA recipe turn it on) must not change any
result". Every mask decision is checked here in every way users turn checkpointing on (on the base before
``get_peft_model``, on the peft model after it, through ``prepare_model_for_kbit_training`` on a 4-bit model, through
``TrainingArguments(gradient_checkpointing=True)``), reentrant and not:

* ``select_mask`` (``selection="gradient"``, global and local budgets) and ``update_mask`` (``update="dynamic"``) must
  choose exactly the entries they choose without checkpointing (same fp32 arithmetic, so the same bits), from the
  salience a float64 dense model gives by plain autograd, and must leave every parameter's ``.grad`` as it was;
* SpIEL-AG's window statistics (candidates and their accumulated gradients) and its update must be the same;
* training gradients of the values must be the same.

Where no gradient can reach the sparse layers (reentrant checkpointing of blocks whose inputs do not require grad, e.g.
``inputs_embeds`` passed directly: the blocks are then cut from the graph), selection must refuse with a ``ValueError``
that names the cause instead of ranking all-zero salience by its tie-breaks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import get_peft_model, prepare_model_for_kbit_training
from tiny_models import count_block_forwards, llama_of_width, make_batch, quantised_tiny_llama, tiny_llama
from trainer_helpers import low_rank_factors, make_trainer, sparse_log, sparse_model, sparse_state

from peft_sparse import SparseConfig, SpIEL, select_mask, update_mask
from peft_sparse.selection.select import salience_scores
from peft_sparse.tuner.lookup import sparse_layers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# How checkpointing is turned on. "reentrant" on the base before get_peft_model (transformers then makes the embeddings'
# output require grad); "reentrant-after-wrapping" on the peft model, with enable_input_require_grads by hand.
MODES = ["none", "non-reentrant", "reentrant", "reentrant-after-wrapping"]
CHECKPOINTED = MODES[1:]
# Float64 judge of the fp32 salience: relative L2 error per layer.
SALIENCE_TOLERANCE = 1e-4


def sparse_llama(mode: str, **config) -> torch.nn.Module:
    """``tiny_llama`` (fp32) with a sparse adapter on every linear layer of its blocks, checkpointed as ``mode`` says,
    in train mode (transformers checkpoints only then)."""
    base = tiny_llama()
    if mode in ("non-reentrant", "reentrant"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    config.setdefault("target_modules", TARGETS)
    config.setdefault("density", 0.05)
    model = get_peft_model(base, SparseConfig(**config))
    if mode == "reentrant-after-wrapping":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    assert model.get_base_model().is_gradient_checkpointing == (mode != "none")
    return model.train()


def batches(count: int = 2, model=None) -> list[dict[str, torch.Tensor]]:
    """Salience batches with labels; with ``model``, as ``inputs_embeds`` computed apart from the model (so they do
    not require grad, as embeddings a caller computes itself)."""
    result = []
    for seed in range(count):
        batch = make_batch(seed=seed, batch=2, length=8)
        batch["labels"] = batch["input_ids"].clone()
        if model is not None:
            weight = model.get_base_model().get_input_embeddings().weight.detach()
            batch["inputs_embeds"] = torch.nn.functional.embedding(batch.pop("input_ids"), weight)
        result.append(batch)
    return result


def masks(model) -> dict[str, torch.Tensor]:
    return {name: layer.sparse_indices["default"].clone() for name, layer in sparse_layers(model)}


def assert_same_masks(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    differ = [name for name in expected if not torch.equal(actual[name], expected[name])]
    assert not differ, f"{len(differ)} of {len(expected)} layers chose other entries, e.g. {differ[:3]}"


def float64_gradient_salience(data) -> dict[str, torch.Tensor]:
    """|sum over batches of dL/dW| of every targeted weight of the float64 ``tiny_llama``, by plain autograd: what
    ``selection="gradient"`` ranks on a fresh adapter (all values zero, so the adapted model is the base)."""
    model = tiny_llama(dtype=torch.float64).train()
    model.requires_grad_(False)
    weights = {name: module.weight for name, module in model.named_modules() if name.split(".")[-1] in TARGETS}
    for weight in weights.values():
        weight.requires_grad_(True)
    for batch in data:
        model(**batch).loss.backward()
    return {name: weight.grad.abs() for name, weight in weights.items()}


@pytest.fixture(scope="module")
def unchecked_masks():
    """The masks ``select_mask`` chooses without checkpointing, by budget."""
    result = {}
    for budget in ("global", "local"):
        model = sparse_llama("none", selection="gradient", budget=budget)
        select_mask(model, batches())
        result[budget] = masks(model)
    return result


@pytest.mark.parametrize("mode", MODES)
def test_gradient_salience_is_the_float64_gradient_in_every_mode(mode):
    """... and measuring it leaves every parameter's ``.grad`` as it was (an optimizer must not see selection)."""
    data = batches()
    expected = float64_gradient_salience(data)
    model = sparse_llama(mode, selection="gradient")
    sentinels = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            parameter.grad = torch.full_like(parameter, 0.25)
            sentinels[name] = parameter.grad
    scores = salience_scores(model, data)
    for name, parameter in model.named_parameters():
        if name in sentinels:
            assert parameter.grad is sentinels[name] and bool((parameter.grad == 0.25).all()), name
    assert len(scores) == len(expected) == 14
    for name, score in scores.items():
        judge = expected[name.removeprefix("base_model.model.")]
        error = float((score.double() - judge).norm() / judge.norm())
        assert error < SALIENCE_TOLERANCE, (mode, name, error)


@pytest.mark.parametrize("budget", ["global", "local"])
@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_select_mask_chooses_what_it_chooses_without_checkpointing(unchecked_masks, mode, budget):
    model = sparse_llama(mode, selection="gradient", budget=budget)
    select_mask(model, batches())
    assert_same_masks(masks(model), unchecked_masks[budget])
    assert all(parameter.grad is None for parameter in model.parameters())  # selection leaves no gradient behind


def four_block_llama(mode: str) -> torch.nn.Module:
    """A 4-block Llama with a sparse adapter on every linear layer of its blocks, checkpointed as ``mode`` says."""
    base = llama_of_width(32, 48, num_hidden_layers=4).train()
    if mode in ("non-reentrant", "reentrant"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    model = get_peft_model(base, SparseConfig(target_modules=TARGETS, density=0.05, selection="gradient"))
    if mode == "reentrant-after-wrapping":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
    return model.train()


@pytest.fixture(scope="module")
def four_block_mask():
    model = four_block_llama("none")
    select_mask(model, batches())
    return masks(model)


@pytest.mark.parametrize("mode", MODES)
def test_layer_groups_choose_the_same_mask_for_about_two_passes(four_block_mask, mode):
    """Four layer groups (one per decoder block): the same entries as one pass without checkpointing, at the cost of
    about two passes (7/3 training steps per batch). Under checkpointing the groups are scored by block replay: a recording pass, then each group
    runs only its own block from the recorded input and back-propagates the recorded gradient, so every block runs
    twice per batch (and is replayed twice by the checkpoint). Before, each group took a whole pass: every block ran
    four forwards per batch here, and under reentrant checkpointing four checkpoint replays too."""
    model = four_block_llama(mode)
    calls = count_block_forwards(model)
    data = batches()
    report = select_mask(model, data, layers_per_pass=7)
    assert_same_masks(masks(model), four_block_mask)
    assert all(parameter.grad is None for parameter in model.parameters())
    b = len(data)
    assert report.replayed and report.passes == 5  # the recording pass, then one (of its own blocks) per group
    assert report.forward_backward_passes == 2 * b
    # every block: a forward in the recording and in its own group's replay (and a checkpoint replay of each)
    assert calls == [(2 if mode == "none" else 4) * b] * 4, calls


@pytest.mark.parametrize("mode", ["none", "reentrant"])
def test_groups_are_recorded_in_rounds_where_host_memory_is_short(four_block_mask, mode, monkeypatch):
    """Host memory for the boundaries of two of the four groups at a time: two recording rounds of two groups each,
    the same mask, and never more than two groups' boundaries kept; not even one group's: whole passes."""
    from peft_sparse.selection import passes

    roomy = select_mask(four_block_llama(mode), batches(), layers_per_pass=7)
    per_group = roomy.replay_bytes // 4  # one block each: its input, its output's gradient, the first batch's output
    monkeypatch.setattr(passes, "_replay_host_limit", lambda *args: 2 * per_group + per_group // 2)
    model = four_block_llama(mode)
    calls = count_block_forwards(model)
    data = batches()
    report = select_mask(model, data, layers_per_pass=7)
    assert_same_masks(masks(model), four_block_mask)
    b = len(data)
    assert report.replayed and report.replay_recordings == 2 and report.passes == 4 + 2
    assert report.replay_bytes == 2 * per_group and report.forward_backward_passes == 3 * b
    # every block runs in both recordings and in its own group's replay (and a checkpoint replay of each)
    assert calls == [(3 if mode == "none" else 6) * b] * 4, calls

    monkeypatch.setattr(passes, "_replay_host_limit", lambda *args: per_group // 2)
    model = four_block_llama(mode)
    report = select_mask(model, data, layers_per_pass=7)
    assert_same_masks(masks(model), four_block_mask)
    assert not report.replayed and report.replay_recordings == 0 and report.passes == 4


def test_the_replay_host_limit_leaves_room_for_a_cpu_models_accumulators(monkeypatch):
    """On a CPU the boundaries share memory with the accumulators the groups allocate after the recording: the
    limit is half of what is free less the largest group's accumulators and scoring."""
    from peft_sparse.selection import passes
    from peft_sparse.selection.salience import METRICS

    model = four_block_llama("none")
    layers = sparse_layers(model)
    plan = passes.plan_groups(layers, METRICS["gradient"], torch.float32, 0, None, 7, "test")
    per_weight = passes.accumulator_bytes_per_weight(METRICS["gradient"], torch.float32)
    scoring = passes.scoring_bytes_per_weight(METRICS["gradient"], torch.float32)
    sizes = [layer.num_weight_entries for _, layer in layers[:7]]
    largest = per_weight * sum(sizes) + scoring * max(sizes)
    monkeypatch.setattr(passes, "free_memory_bytes", lambda device: 10 * largest)
    limit = passes._replay_host_limit(layers, "default", METRICS["gradient"], torch.float32, plan)
    assert limit == int(passes.REPLAY_HOST_SHARE * 9 * largest)
    monkeypatch.setattr(passes, "free_memory_bytes", lambda device: None)
    assert passes._replay_host_limit(layers, "default", METRICS["gradient"], torch.float32, plan) is None


def test_a_replay_that_differs_from_its_recording_falls_back_to_whole_passes(caplog):
    """Dropout inside the blocks: a replay cannot reproduce the recorded output, so each group is checked before
    anything is accumulated and scored by a whole pass instead (and the report does not claim a replay)."""
    base = llama_of_width(32, 48, num_hidden_layers=4, attention_dropout=0.5).train()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(base, SparseConfig(target_modules=TARGETS, density=0.05, selection="gradient")).train()
    with caplog.at_level("INFO", logger="peft_sparse.selection.passes"):
        report = select_mask(model, batches(), layers_per_pass=7)
    assert not report.replayed and report.passes == 5  # the recording, then four whole passes
    assert report.forward_backward_passes == 5 * 2
    assert sum("differs from its recording" in record.getMessage() for record in caplog.records) == 4
    assert all(layer.sparse_indices["default"].numel() for _, layer in sparse_layers(model))


def dynamic_update(mode: str):
    """One ``update_mask`` on an adapter holding (seeded) non-zero values; returns the entries moved per layer and
    every layer's entries, values and residual afterwards."""
    model = sparse_llama(mode, selection="gradient", update="dynamic", init_weights=False)
    report = update_mask(model, batches())
    state = {
        name: (
            layer.sparse_indices["default"].clone(),
            layer.sparse_values["default"].detach().clone(),
            layer.sparse_residual_indices["default"].clone(),
            layer.sparse_residual_values["default"].clone(),
        )
        for name, layer in sparse_layers(model)
    }
    return report.per_layer, state


@pytest.fixture(scope="module")
def unchecked_update():
    return dynamic_update("none")


@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_update_mask_moves_what_it_moves_without_checkpointing(unchecked_update, mode):
    expected_moved, expected = unchecked_update
    assert sum(expected_moved.values()) > 0  # the update does move entries
    moved, state = dynamic_update(mode)
    assert moved == expected_moved
    for name, tensors in expected.items():
        for actual, wanted in zip(state[name], tensors):
            assert torch.equal(actual, wanted), name


def spiel_window(mode: str):
    """Two SpIEL-AG steps (the window is both, the update follows the second): the candidates and gradient sums each
    layer's probe holds just before the update, the update's report and the indices after it."""
    model = sparse_llama(
        mode,
        update="spiel",
        regrow="gradient",
        update_interval=2,
        accumulation_steps=2,
        reselection_rate=0.3,
        reselection_schedule="constant",
    )
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    spiel = SpIEL(model, optimizer, num_training_steps=10)
    statistics = report = None
    for step, batch in enumerate(batches(2)):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1:
            statistics = {
                name: (layer.salience_probe.candidates, layer.salience_probe.sums)
                for name, layer in sparse_layers(model)
            }
        report = spiel.step()
    return statistics, report.per_layer, masks(model)


@pytest.fixture(scope="module")
def unchecked_spiel():
    return spiel_window("none")


@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_spiel_ag_window_statistics_and_update_match_no_checkpointing(unchecked_spiel, mode):
    expected_statistics, expected_moved, expected_masks = unchecked_spiel
    assert sum(expected_moved.values()) > 0
    statistics, moved, after = spiel_window(mode)
    for name, (candidates, sums) in expected_statistics.items():
        assert statistics[name][0] is not None, (name, "the window saw no gradient")
        assert torch.equal(statistics[name][0], candidates), name
        torch.testing.assert_close(statistics[name][1], sums, rtol=1e-5, atol=1e-7)
    assert moved == expected_moved
    assert_same_masks(after, expected_masks)


@pytest.mark.parametrize("r", [0, 4], ids=["sparse", "hybrid"])
@pytest.mark.parametrize("mode", CHECKPOINTED)
def test_training_gradients_of_the_values_match_no_checkpointing(mode, r):
    """Every trainable tensor's gradient: the values and, for the sparse + low-rank hybrid, its factors."""

    def grads(mode):
        model = sparse_llama(mode, init_weights=False, r=r)
        model(**batches(1)[0]).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}

    expected, actual = grads("none"), grads(mode)
    values = [name for name in expected if "sparse_values" in name]
    assert sum("sparse_lora_" in name for name in expected) == (2 * len(values) if r else 0)
    for name, grad in expected.items():
        assert actual[name] is not None and bool(grad.any()), name
        torch.testing.assert_close(actual[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_inputs_embeds_give_the_same_mask_when_checkpointing_is_not_reentrant(unchecked_masks):
    model = sparse_llama("non-reentrant", selection="gradient", budget="global")
    select_mask(model, batches(model=model))
    assert_same_masks(masks(model), unchecked_masks["global"])


@pytest.mark.parametrize("targets", [TARGETS, [*TARGETS, "lm_head"]], ids=["blocks", "blocks-and-head"])
@pytest.mark.parametrize("select", ["select_mask", "update_mask"])
def test_selection_refuses_blocks_that_reentrant_checkpointing_cut_from_the_graph(targets, select):
    """Reentrant checkpointing of blocks whose input does not require grad (``inputs_embeds`` computed by the
    caller) leaves the blocks out of the graph: no gradient can reach their sparse layers (training's neither). With
    only block layers targeted the loss does not require grad; with the head targeted too it does, and only the
    block layers' salience would silently be zeros."""
    model = sparse_llama("reentrant", selection="gradient", target_modules=targets, update="dynamic")
    before = masks(model)
    with pytest.raises(ValueError, match=r"(?s)use_reentrant.*enable_input_require_grads"):
        (select_mask if select == "select_mask" else update_mask)(model, batches(model=model))
    assert_same_masks(masks(model), before)  # nothing half-applied


# --- 4-bit: peft's QLoRA recipe (prepare_model_for_kbit_training turns reentrant checkpointing on) ---------------

KBIT_MODES = {
    "none": {"use_gradient_checkpointing": False},
    "reentrant": {},  # the recipe's default: checkpoint() without use_reentrant, which torch takes as reentrant
    "non-reentrant": {"gradient_checkpointing_kwargs": {"use_reentrant": False}},
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev extra; the 4-bit case needs it")
    return tmp_path_factory.mktemp("tiny_llama_4bit")


def kbit_select(model_dir, mode: str, layers_per_pass: int | None = None) -> dict[str, torch.Tensor]:
    base = quantised_tiny_llama(
        model_dir,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    base = prepare_model_for_kbit_training(base, **KBIT_MODES[mode])
    assert base.is_gradient_checkpointing == (mode != "none")
    model = get_peft_model(base, SparseConfig(target_modules=TARGETS, density=0.05, selection="gradient")).train()
    assert all(type(layer.get_base_layer().weight).__name__ == "Params4bit" for _, layer in sparse_layers(model))
    report = select_mask(model, batches(), layers_per_pass=layers_per_pass)
    if layers_per_pass is not None:
        assert report.replayed, report
    return masks(model)


@pytest.fixture(scope="module")
def unchecked_kbit_masks(model_dir):
    return kbit_select(model_dir, "none")


@pytest.mark.parametrize("layers_per_pass", [None, 3], ids=["one-pass", "replayed-groups"])
@pytest.mark.parametrize("mode", ["reentrant", "non-reentrant"])
def test_select_mask_on_a_4bit_model_prepared_for_kbit_training(
    model_dir, unchecked_kbit_masks, mode, layers_per_pass
):
    """The QLoRA recipe; in groups of 3 of the 14 layers (5 groups, one spanning both blocks), by block replay."""
    assert_same_masks(kbit_select(model_dir, mode, layers_per_pass), unchecked_kbit_masks)


# --- transformers Trainer: TrainingArguments(gradient_checkpointing=True) + SparseTrainingCallback ---------------


def trained_with_callback(tmp_path, r: int = 0, **arguments):
    """Selection at train begin and a dynamic update after step 1, by the callback, over two steps: every layer's
    indices and values, and the low-rank factors of the hybrid (``r > 0``)."""
    model = sparse_model(selection="gradient", update="dynamic", update_interval=1, r=r)
    trainer = make_trainer(model, tmp_path, max_steps=2, **arguments)
    trainer.train()
    log = sparse_log(trainer)
    assert len(log) == 2 and "sparse/selected_entries" in log[0] and "sparse/moved" in log[1]
    assert log[1]["sparse/update_forward_backward"] == log[1]["sparse/update_passes"] * log[1]["sparse/update_batches"]
    assert log[1]["sparse/update_passes"] >= 1
    factors = low_rank_factors(model)
    assert bool(factors) == (r > 0)
    return sparse_state(model), factors


@pytest.fixture(scope="module", params=[0, 4], ids=["sparse", "hybrid"])
def unchecked_trainer_state(request, tmp_path_factory):
    return request.param, trained_with_callback(tmp_path_factory.mktemp("plain"), r=request.param)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_trainer_with_gradient_checkpointing_selects_and_updates_as_without(
    unchecked_trainer_state, tmp_path, use_reentrant
):
    r, (expected, expected_factors) = unchecked_trainer_state
    state, factors = trained_with_callback(
        tmp_path, r=r, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant}
    )
    for name, (indices, values) in expected.items():
        assert torch.equal(state[name][0], indices), name
        torch.testing.assert_close(state[name][1], values, rtol=1e-5, atol=1e-6)
    assert factors.keys() == expected_factors.keys()
    for name, factor in expected_factors.items():
        torch.testing.assert_close(factors[name], factor, rtol=1e-5, atol=1e-6, msg=name)


def test_the_callback_warns_when_checkpointing_cut_trained_layers_from_the_graph():
    """Training itself goes blind the same way (torch only warns that no input requires grad): the callback names
    the starved layers before the first optimizer step, and says nothing when every layer got its gradient."""
    from peft_sparse import SparseTrainingCallback

    def first_step(data):
        model = sparse_llama("reentrant", selection="random", target_modules=[*TARGETS, "lm_head"])
        with pytest.warns(UserWarning):  # torch's own: "None of the inputs have requires_grad=True"
            model(**data[0]).loss.backward()
        callback = SparseTrainingCallback()
        return lambda: callback.on_pre_optimizer_step(None, None, None, model=model)

    step = first_step(batches(model=sparse_llama("none")))
    with pytest.warns(RuntimeWarning, match=r"14 of 15 sparse layers .* got no gradient .*enable_input_require_grads"):
        step()

    model = sparse_llama("reentrant", selection="random", target_modules=[*TARGETS, "lm_head"])
    model(**batches()[0]).loss.backward()  # input_ids: transformers makes the embeddings' output require grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseTrainingCallback().on_pre_optimizer_step(None, None, None, model=model)
