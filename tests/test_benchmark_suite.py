"""`benchmarks/suite.py`, the task suite that chooses defaults: its rate rule, its tuning / held-out split and its
data splits (on the Debian data packages CI installs: fortunes-de, -it, -br, -min and wordnet-base)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common
import suite


def test_the_ladder_steps_one_three_ten_both_ways():
    assert common.ladder(3e-3, up=True) == 1e-2
    assert common.ladder(1e-2, up=True) == 3e-2
    assert common.ladder(3e-4, up=False) == 1e-4
    assert common.ladder(1e-4, up=False) == 3e-5


def _records(losses: dict[float, float]):
    calls = []

    def get(lr):
        calls.append(lr)
        return None if lr not in losses else {"validation_loss": losses[lr]}

    return get, calls


def test_a_best_rate_inside_the_grid_ends_the_sweep():
    get, calls = _records({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.8})
    assert common.sweep((1e-3, 3e-3, 1e-2), get, "validation_loss") == ([1e-3, 3e-3, 1e-2], 3e-3)
    assert sorted(set(calls)) == [1e-3, 3e-3, 1e-2]


def test_a_best_rate_at_an_edge_extends_the_grid_that_way_at_most_twice():
    get, _ = _records({1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.2, 3e-2: 1.1, 1e-1: 1.0})
    grid, best = common.sweep((1e-3, 3e-3, 1e-2), get, "validation_loss")
    assert grid == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and best == 1e-1  # still at the edge, but no third extension
    get, _ = _records({1e-4: 1.3, 3e-4: 1.0, 1e-3: 1.2, 3e-3: 1.5, 1e-2: 1.8})
    assert common.sweep((1e-3, 3e-3, 1e-2), get, "validation_loss") == ([1e-4, 3e-4, 1e-3, 3e-3, 1e-2], 3e-4)


def test_a_diverged_run_never_wins_and_a_missing_run_leaves_no_best():
    get, _ = _records({3e-4: 2.5, 1e-3: 2.0, 3e-3: float("nan"), 1e-2: float("inf")})
    assert common.sweep((1e-3, 3e-3, 1e-2), get, "validation_loss") == ([3e-4, 1e-3, 3e-3, 1e-2], 1e-3)
    get, _ = _records({1e-3: 2.0, 3e-3: 1.5})
    assert common.sweep((1e-3, 3e-3, 1e-2), get, "validation_loss") == ([1e-3, 3e-3, 1e-2], None)


def test_every_kind_of_task_has_a_tuning_and_a_held_out_member():
    kinds: dict[str, set[str]] = {}
    for task in suite.TASKS.values():
        kinds.setdefault(task.kind.split(":")[0], set()).add(task.role)
        assert task.role in ("tuning", "held-out")
    roles = {task.role for task in suite.TASKS.values()}
    assert roles == {"tuning", "held-out"}
    assert sum(task.role == "tuning" for task in suite.TASKS.values()) == 3
    assert all(found == {"tuning", "held-out"} for found in kinds.values()), kinds


@pytest.mark.parametrize("name", ["quotes_de", "quotes_it"])
def test_quotation_tasks_hold_out_texts_never_trained_on(name):
    train, evaluation = suite.TASKS[name].build()
    seen = set(train["text"])
    assert len(seen) == 240 and set(evaluation) == {"validation", "test"}
    for split in evaluation.values():
        assert len(split) == 64 and not seen & set(split["text"])
    assert not set(evaluation["validation"]["text"]) & set(evaluation["test"]["text"])


@pytest.mark.parametrize("name", ["wordnet", "hypernyms"])
def test_instruction_tasks_hold_out_words_never_trained_on(name):
    train, evaluation = suite.TASKS[name].build()

    def words(rows):
        return {row["prompt"][0]["content"].split("'")[1] for row in rows}

    trained = words(train)
    for split in evaluation.values():
        assert len(split) >= 100 and not trained & words(split)


def test_hypernym_answers_name_another_thing():
    examples = suite.hypernym_examples()
    assert len(examples) > 2250
    for word, example in examples[:500]:
        assert example["answer"] and example["answer"].lower() != word
        assert example["completion"][0]["content"] == example["answer"]


def test_the_row_balanced_score_gives_every_row_its_strongest_entries():
    import torch
    from mask_diagnosis import score_variant

    from peft_sparse.selection import salience

    grad = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)) * torch.logspace(0, 3, 8)[:, None]
    with score_variant("row_balanced", density=0.25):
        score = salience.METRICS["gradient"].score(grad=grad.clone())
    assert salience.METRICS["gradient"].score is salience._gradient  # restored on exit
    chosen = score.flatten().topk(24).indices
    rows = chosen // 12
    assert torch.bincount(rows, minlength=8).tolist() == [3] * 8  # plain |G| would fill the loud rows first
    expected = grad.abs().topk(3, dim=1).indices + torch.arange(8)[:, None] * 12
    assert set(chosen.tolist()) == set(expected.flatten().tolist())


def test_the_adam_gain_score_discounts_gradients_that_change_sign():
    import torch
    from mask_diagnosis import score_variant

    from peft_sparse.selection import salience

    grad = torch.tensor([[2.0, 2.0, 0.5]])  # summed over batches
    square = torch.tensor([[4.0, 16.0, 0.25]])  # the first entry's batches agree, the second's cancel
    with score_variant("adam_gain"):
        assert salience.METRICS["gradient"].needs_grad_square
        score = salience.METRICS["gradient"].score(grad=grad.clone(), grad_square=square.clone())
    assert not salience.METRICS["gradient"].needs_grad_square  # restored on exit
    assert torch.allclose(score, torch.tensor([[2.0, 1.0, 0.5]]))  # G^2 / sqrt(sum g_b^2)
    assert score[0, 1] < score[0, 0]  # |G| ties them


def test_a_method_may_name_its_salience_batches_and_bad_names_are_refused():
    assert suite.parse_method("gradient") == ("gradient", None)
    assert suite.parse_method("gradient@16") == ("gradient", 16)
    for bad in ("gradiant", "gradient@x", "gradient@-1", "@16"):
        with pytest.raises(argparse.ArgumentTypeError, match="a method of"):
            suite.parse_method(bad)
    store, method, label = suite.method_store("quotes_de", "gradient@16", 4)
    assert (store.salience_batches, method) == (16, "gradient") and label.endswith(
        "16 salience batches (`SparseConfig`'s default)"
    )
    assert suite.method_store("quotes_de", "gradient", 4)[0].salience_batches == 4
    assert not suite.method_store("quotes_de", "gradient", 4)[2].endswith("default)")
    # a random mask scores no salience: sft's default whatever the batches, and its records found at any of them
    assert suite.method_store("quotes_de", "hybrid_random", 4)[2].endswith("(`peft-sparse sft`'s default)")
    assert not suite.scores_salience("hybrid_random") and not suite.scores_salience("lora")
    assert suite.scores_salience("hybrid_rates") and suite.scores_salience("spiel_gradient")


def test_a_rate_study_is_reported_at_its_rate_and_an_unfinished_one_not_at_all():
    class Records(suite.Store):
        def __init__(self, records):
            self.task, self.salience_batches, self.records = suite.TASKS["quotes_de"], 16, records

    study = [
        {"method": "gradient", "lr": 1e-3, "seed": s, "salience_batches": 16, "validation_loss": 3.0}
        for s in (0, 1, 2)
    ]
    assert suite.study_rate(Records(study), "gradient") == 1e-3
    assert [r["seed"] for r in suite.seed_results(Records(study), "gradient")] == [0, 1, 2]
    assert suite.study_rate(Records(study[:2]), "gradient") is None
    assert suite.seed_results(Records(study[:2]), "gradient") == []


def test_a_run_recorded_without_its_training_loss_gets_it_from_a_run_that_reproduces_it(tmp_path, monkeypatch):
    """``fit`` runs an old record again, writes the training loss into it only where the rerun reproduces the
    recorded headline score, and refuses one that does not."""
    task = suite.TASKS["quotes_de"]
    monkeypatch.setattr(suite, "RECORDS", tmp_path)
    old = [
        {"method": "lora", "lr": 3e-3, "seed": s, "salience_batches": 4, "validation_loss": 3.7, "test_loss": 3.6 + s}
        for s in (0, 1, 2)
    ]
    (tmp_path / "quotes_de.json").write_text(suite.json.dumps(old))
    reruns = []

    def rerun(task_, method, lr, seed, batches):
        reruns.append(seed)
        return {**old[seed], "test_loss": old[seed]["test_loss"] + (0.1 if seed == 2 else 0.0), "train_loss": 1.0}

    monkeypatch.setattr(suite, "run", rerun)
    store = suite.Store(task, 4)
    assert store.add_train_loss(old[0])["train_loss"] == 1.0
    assert suite.Store(task, 4).find("lora", 3e-3, 0)["train_loss"] == 1.0  # written back in place
    assert "train_loss" not in suite.Store(task, 4).find("lora", 3e-3, 1)
    with pytest.raises(RuntimeError, match="not reproducible"):
        store.add_train_loss(old[2])
    assert "train_loss" not in suite.Store(task, 4).find("lora", 3e-3, 2)
    done = suite.Store(task, 4).find("lora", 3e-3, 0)
    assert store.add_train_loss(done) == done and reruns == [0, 2]  # a record with its training loss is not rerun


def test_layer_adam_steps_in_proportion_to_the_gradient_at_adams_rms():
    """One second moment per tensor: the first step is ``-lr * g / rms(g)`` (Adam's would be ``-lr * sign(g)``), and
    tensors are normalised apart."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(2))
    optimizer = suite.LayerAdam([a, b], lr=0.1)
    a.grad, b.grad = torch.tensor([1.0, 2.0, -3.0, 0.0]), torch.tensor([1e-4, -1e-4])
    optimizer.step()
    expected = -0.1 * a.grad / a.grad.pow(2).mean().sqrt()
    assert torch.allclose(a.detach(), expected, rtol=1e-5) and torch.allclose(
        b.detach(), torch.tensor([-0.1, 0.1]), rtol=1e-3
    )
    a.grad = torch.tensor([1.0, 2.0, -3.0, 0.0])
    optimizer.step()  # a constant gradient: the same step again (bias-corrected moments)
    assert torch.allclose(a.detach(), 2 * expected, rtol=1e-5)


def _one_sparse_projection(density: float, **config):
    """(peft model, its one sparse layer, that layer's values): a random mask on a 32-wide Llama's ``q_proj``
    (``config``: more SparseConfig fields)."""
    from peft import get_peft_model
    from tiny_models import llama_of_width

    from peft_sparse import SparseConfig
    from peft_sparse.tuner.lookup import sparse_layers

    model = get_peft_model(
        llama_of_width(32, 48, num_hidden_layers=1),
        SparseConfig(target_modules=["q_proj"], density=density, selection="random", **config),
    )
    ((_, layer),) = sparse_layers(model, "default")
    return model, layer, layer.sparse_values["default"]


def test_row_scaled_adam_slows_crowded_rows_and_leaves_an_even_mask_as_adam():
    model, layer, values = _one_sparse_projection(density=0.1)
    optimizer = suite.RowScaledAdam(model, lr=0.1)
    values.grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(0))
    optimizer.step()  # Adam's first step is lr * sign(g); each entry's is scaled by its row's crowding
    rows = layer.sparse_indices["default"].long() // layer.logical_shape[1]
    counts = torch.bincount(rows, minlength=layer.logical_shape[0]).float()
    scale = (counts[counts > 0].mean() / counts[rows]).sqrt()
    assert counts.max() > counts[counts > 0].min()  # the random mask's rows are uneven enough to tell
    assert torch.allclose(values.detach(), -0.1 * values.grad.sign() * scale, atol=1e-6)


def test_the_trained_rows_are_those_collated_between_train_begin_and_end():
    """Salience batches (before train begin) and evaluation batches (after train end) go through the same collator;
    only the training's rows count, and only the first epoch's."""

    class Trainer:
        def __init__(self):
            self.train_dataset, self.callbacks = list(range(4)), []

        def data_collator(self, rows):
            return len(rows)

        def add_callback(self, callback):
            self.callbacks.append(callback)

    trainer = Trainer()
    trained = suite._record_trained_rows(trainer)
    (callback,) = trainer.callbacks
    assert trainer.data_collator([10, 11]) == 2  # a salience batch
    callback.on_train_begin()
    trainer.data_collator([0, 1, 2])
    trainer.data_collator([3, 0, 1])  # the second epoch begins
    callback.on_train_end()
    trainer.data_collator([20, 21])  # evaluation
    assert trained == [0, 1, 2, 3]


def test_column_scaled_adam_caps_the_steps_of_entries_on_loud_input_channels():
    model, layer, values = _one_sparse_projection(density=0.2)
    optimizer = suite.ColumnScaledAdam(model, lr=0.1)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    x[:, 3] *= 100  # one loud channel
    layer(x).sum().backward()
    optimizer.step()
    cols = layer.sparse_indices["default"].long() % 32
    rms = x.pow(2).mean(0).sqrt()
    expected = -0.1 * values.grad.sign() * (rms.median() / rms[cols]).clamp(max=1)
    assert (cols == 3).any() and torch.allclose(values.detach(), expected, atol=1e-6)
    assert values.detach()[cols == 3].abs().max() < 0.01  # the loud channel's entries barely move
    layer(x)  # the statistics are taken once: the hooks are gone
    assert optimizer._squares[layer][1] == 64


def test_the_mixed_score_keeps_the_gradients_top_half_and_fills_the_rest_at_random():
    from mask_diagnosis import MIXED_GRADIENT_SHARE, score_variant

    from peft_sparse.selection import salience

    grad = torch.randn(16, 20, generator=torch.Generator().manual_seed(0))
    k = 80  # density 0.25
    with score_variant("mixed", density=0.25):
        chosen = salience.METRICS["gradient"].score(grad=grad.clone()).flatten().topk(k).indices
        (recorded,) = score_variant.gradient_chosen
    by_gradient = grad.abs().flatten().topk(round(k * MIXED_GRADIENT_SHARE)).indices
    assert torch.equal(recorded, by_gradient.sort().values)
    assert set(by_gradient.tolist()) <= set(chosen.tolist())
    rest = set(chosen.tolist()) - set(by_gradient.tolist())
    next_by_gradient = set(grad.abs().flatten().topk(k).indices.tolist()) - set(by_gradient.tolist())
    assert len(rest) == k - len(by_gradient) and rest != next_by_gradient  # random, not |G|'s next best


def test_mixed_adam_steps_the_random_entries_at_ten_times_the_rate():
    from mask_diagnosis import score_variant

    model, layer, values = _one_sparse_projection(density=0.2)
    indices = layer.sparse_indices["default"].long()
    gradient = torch.zeros(indices.numel(), dtype=torch.bool)
    gradient[::3] = True
    score_variant.gradient_chosen = [torch.randint(0, 10, (5,)) + 10**6, indices[gradient]]  # one set fits
    optimizer = suite.MixedAdam(model, lr=0.01)
    values.grad = torch.randn(values.shape, generator=torch.Generator().manual_seed(0))
    optimizer.step()
    expected = -0.01 * values.grad.sign() * torch.where(gradient, 1.0, suite.MixedAdam.RANDOM_RATE_RATIO)
    assert torch.allclose(values.detach(), expected, atol=1e-6)
    score_variant.gradient_chosen = []


def test_the_hybrid_optimizer_trains_the_low_rank_term_at_three_times_the_values_rate():
    model, _, _ = _one_sparse_projection(density=0.1, r=2, lora_alpha=4)
    optimizer = suite._hybrid_adam(model, lr=1e-3)
    values, low_rank = optimizer.param_groups
    named = {id(p): name for name, p in model.named_parameters()}
    assert values["lr"] == 1e-3 and low_rank["lr"] == 3e-3 and values["weight_decay"] == low_rank["weight_decay"] == 0
    assert [named[id(p)].split(".")[-2] for p in values["params"]] == ["sparse_values"]
    assert sorted(named[id(p)].split(".")[-2] for p in low_rank["params"]) == ["sparse_lora_A", "sparse_lora_B"]


def test_the_hybrid_methods_train_their_term_at_one_rate_and_at_three_times_it_exactly_once():
    from tiny_models import tiny_llama

    one_rate, _ = suite.adapter("hybrid", tiny_llama(), seed=0, salience_batches=4)
    rates, _ = suite.adapter("hybrid_rates", tiny_llama(), seed=0, salience_batches=4)
    # the library's default ratio (3) would compound with hybrid_rates' optimizer groups (3x): both pin it to 1
    assert one_rate.low_rank_lr_ratio == rates.low_rank_lr_ratio == 1.0
    assert "hybrid" not in suite.OPTIMIZERS and suite.OPTIMIZERS["hybrid_rates"] is suite._hybrid_adam
