"""SpIEL prune-and-regrow (AG and MA), its schedule, and the SM3 optimizer that SpIEL-MA relies on."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from peft import get_peft_model
from tiny_models import make_batch, tiny_llama
from torch import nn

from peft_sparse import SparseConfig, SparseLayer, SpIEL
from peft_sparse.optim import SM3
from peft_sparse.selection import reselection_fraction

OUT, IN = 8, 16


class OneLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(IN, OUT, bias=False)

    def forward(self, x):
        return self.proj(x)


def one_layer_model(k=20, **config):
    config.setdefault("update", "spiel")
    model = get_peft_model(OneLayer(), SparseConfig(target_modules=["proj"], num_tunable_weights=k, **config))
    layer = next(m for m in model.modules() if isinstance(m, SparseLayer))
    return model, layer


def flat(row, col):
    return row * IN + col


def step(model, optimizer, spiel, x, target):
    loss = (model(x) * target).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return spiel.step()


def test_reselection_fraction_follows_the_documented_schedules():
    assert reselection_fraction(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert reselection_fraction(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert reselection_fraction(25, 100, 0.2, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert reselection_fraction(100, 100, 0.2, "cosine") == pytest.approx(0.0)
    assert reselection_fraction(30, 100, 0.2, "linear") == pytest.approx(0.14)
    assert reselection_fraction(99, 100, 0.2, "constant") == 0.2
    assert reselection_fraction(100, 100, 0.2, "constant") == 0.0
    fractions = [reselection_fraction(t, 100, 0.3, "cosine") for t in range(0, 101, 10)]
    assert all(a > b for a, b in itertools.pairwise(fractions))  # strictly decaying
    with pytest.raises(ValueError, match="schedule"):
        reselection_fraction(1, 10, 0.1, "step")


def test_accumulated_gradient_regrowth_picks_the_planted_entries():
    planted = {flat(1, 3), flat(5, 3), flat(6, 11)}
    model, layer = one_layer_model(
        k=20, update_interval=2, accumulation_steps=2, reselection_rate=0.15, reselection_schedule="constant"
    )
    generator = torch.Generator().manual_seed(0)
    inactive_start = torch.tensor(sorted(set(torch.randperm(OUT * IN, generator=generator).tolist()) - planted)[:20])
    layer.set_sparse_entries("default", inactive_start.to(torch.int32))
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=1e-3)
    spiel = SpIEL(model, optimizer, num_training_steps=100)
    # Two samples whose gradient outer products are large exactly at the planted (row, col) positions.
    x = torch.randn(2, IN, generator=generator) * 0.01
    x[0, 3] = x[1, 11] = 10.0
    target = torch.randn(2, OUT, generator=generator) * 0.01
    target[0, 1] = target[0, 5] = target[1, 6] = 10.0
    old = set(layer.sparse_indices["default"].tolist())
    assert step(model, optimizer, spiel, x, target) is None
    report = step(model, optimizer, spiel, x, target)
    assert report is not None and report.total == 3 and report.fraction == 0.15
    new = set(layer.sparse_indices["default"].tolist())
    assert new - old == planted
    assert len(new) == 20


def test_momentum_regrowth_ranks_by_sm3_row_times_column_statistics():
    model, layer = one_layer_model(
        k=20, regrow="momentum", update_interval=5, reselection_rate=0.2, reselection_schedule="constant"
    )
    optimizer = SM3(model, lr=0.01)
    spiel = SpIEL(model, optimizer, num_training_steps=100)
    x, target = torch.randn(4, IN), torch.randn(4, OUT)
    step(model, optimizer, spiel, x, target)
    state = optimizer.state[layer.sparse_values["default"]]
    generator = torch.Generator().manual_seed(3)
    state["row_accumulator"].copy_(torch.rand(OUT, generator=generator))
    state["col_accumulator"].copy_(torch.rand(IN, generator=generator))
    old = layer.sparse_indices["default"].to(torch.int64)
    scores = torch.outer(state["row_accumulator"], state["col_accumulator"]).reshape(-1)
    scores[old] = -1
    expected = set(torch.topk(scores, 4).indices.tolist())  # int(0.2 * 20) = 4; random floats: no ties
    report = spiel.reselect()
    new = set(layer.sparse_indices["default"].tolist())
    assert report.total == 4
    assert new - set(old.tolist()) == expected


def test_prune_drops_the_entries_that_moved_least_since_growth():
    model, layer = one_layer_model(
        k=20, update_interval=5, accumulation_steps=1, reselection_rate=0.25, reselection_schedule="constant"
    )
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=1e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=100)
    generator = torch.Generator().manual_seed(1)
    x, target = torch.randn(3, IN, generator=generator), torch.randn(3, OUT, generator=generator)
    for _ in range(4):
        step(model, optimizer, spiel, x, target)
    (model(x) * target).sum().backward()  # step 5 by hand, so the values at the update are known exactly
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():  # every value started at zero: movement = |value|
        signs = torch.randint(0, 2, (20,), generator=generator) * 2 - 1
        sizes = torch.linspace(0.05, 1, 20)[torch.randperm(20, generator=generator)]
        layer.sparse_values["default"].copy_(sizes * signs)
    old_indices = layer.sparse_indices["default"].tolist()
    magnitudes = layer.sparse_values["default"].detach().abs()
    least_moved = {old_indices[i] for i in torch.argsort(magnitudes)[:5].tolist()}
    report = spiel.step()
    assert report is not None and report.total == 5  # int(0.25 * 20)
    new_indices = layer.sparse_indices["default"].tolist()
    assert set(old_indices) - set(new_indices) == least_moved
    grown = [i for i, index in enumerate(new_indices) if index not in set(old_indices)]
    assert len(grown) == 5 and torch.all(layer.sparse_values["default"].detach()[grown] == 0)


def test_model_function_changes_only_by_the_pruned_deltas():
    model, layer = one_layer_model(
        k=24, update_interval=3, accumulation_steps=2, reselection_rate=0.25, reselection_schedule="constant"
    )
    optimizer = torch.optim.SGD([layer.sparse_values["default"]], lr=0.1)
    spiel = SpIEL(model, optimizer, num_training_steps=100)
    generator = torch.Generator().manual_seed(2)
    x, target = torch.randn(5, IN, generator=generator), torch.randn(5, OUT, generator=generator)
    probe = torch.randn(7, IN, generator=generator)
    for _ in range(2):
        step(model, optimizer, spiel, x, target)
    # Step 3 by hand: backward + optimizer step, snapshot, then SpIEL's update.
    (model(x) * target).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    snapshot = copy.deepcopy(model)
    old_indices = layer.sparse_indices["default"].tolist()
    report = spiel.step()
    assert report is not None and report.total == 6
    new_indices = set(layer.sparse_indices["default"].tolist())
    snapshot_layer = next(m for m in snapshot.modules() if isinstance(m, SparseLayer))
    with torch.no_grad():
        for position, index in enumerate(old_indices):
            if index not in new_indices:
                snapshot_layer.sparse_values["default"][position] = 0.0
    assert torch.equal(model(probe), snapshot(probe))


def test_surviving_adam_moments_follow_their_entries_and_new_ones_are_zero():
    model, layer = one_layer_model(
        k=24, update_interval=4, accumulation_steps=2, reselection_rate=0.25, reselection_schedule="constant"
    )
    values = layer.sparse_values["default"]
    optimizer = torch.optim.AdamW([values], lr=1e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=100)
    generator = torch.Generator().manual_seed(4)
    x, target = torch.randn(5, IN, generator=generator), torch.randn(5, OUT, generator=generator)
    for _ in range(3):
        step(model, optimizer, spiel, x, target)
    (model(x) * target).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    state = optimizer.state[values]
    before = {
        index: (state["exp_avg"][i].item(), state["exp_avg_sq"][i].item(), values[i].item())
        for i, index in enumerate(layer.sparse_indices["default"].tolist())
    }
    report = spiel.step()
    assert report.total == 6
    for i, index in enumerate(layer.sparse_indices["default"].tolist()):
        if index in before:
            assert (state["exp_avg"][i].item(), state["exp_avg_sq"][i].item(), values[i].item()) == before[index]
        else:
            assert state["exp_avg"][i] == 0 and state["exp_avg_sq"][i] == 0 and values[i] == 0


@pytest.mark.parametrize("regrow", ["gradient", "momentum"])
def test_training_learns_keeps_k_fixed_and_indices_sorted_unique(regrow):
    model = get_peft_model(
        tiny_llama(),
        SparseConfig(
            target_modules=["q_proj", "v_proj", "down_proj"],
            density=0.05,
            budget="global",
            update="spiel",
            regrow=regrow,
            update_interval=3,
            accumulation_steps=2,
            reselection_rate=0.3,
        ),
    )
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    sizes = [layer.sparse_indices["default"].numel() for layer in layers]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = SM3(model, lr=0.05) if regrow == "momentum" else torch.optim.AdamW(params, lr=1e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=20)
    model.train()
    batch = make_batch(seed=1, batch=4, length=12)
    losses = []
    for _ in range(20):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        spiel.step()
    assert [report.step for report in spiel.history] == [3, 6, 9, 12, 15, 18]
    # It learns, and no prune-and-regrow sets it back: the loss on the (fixed) batch falls at every step.
    assert all(after < before for before, after in itertools.pairwise(losses)), losses
    assert sum(report.total for report in spiel.history) > 0
    for layer, size in zip(layers, sizes):
        indices = layer.sparse_indices["default"]
        assert indices.numel() == size and layer.sparse_values["default"].numel() == size
        assert torch.all(indices[1:] > indices[:-1])
        assert layer.salience_probe is None  # no probe left behind
    fractions = [report.fraction for report in spiel.history]
    assert fractions == [pytest.approx(reselection_fraction(s, 20, 0.3, "cosine")) for s in (3, 6, 9, 12, 15, 18)]


def test_spiel_rejects_bad_setups():
    model, layer = one_layer_model(update="static")
    with pytest.raises(ValueError, match="update='spiel'"):
        SpIEL(model, None, num_training_steps=10)
    model, layer = one_layer_model(regrow="momentum")
    with pytest.raises(TypeError, match="SM3"):
        SpIEL(model, torch.optim.AdamW([layer.sparse_values["default"]]), num_training_steps=10)
    with pytest.raises(ValueError, match="num_training_steps"):
        SpIEL(model, SM3(model), num_training_steps=0)


def test_spiel_state_dict_round_trip_restores_the_schedule_and_growth_record():
    model, layer = one_layer_model(k=20, update_interval=4, accumulation_steps=2)
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=1e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=50)
    x, target = torch.randn(3, IN), torch.randn(3, OUT)
    for _ in range(5):
        step(model, optimizer, spiel, x, target)
    state = spiel.state_dict()
    other = SpIEL(model, optimizer, num_training_steps=50)
    other.load_state_dict(state)
    assert other.completed_steps == 5
    assert all(torch.equal(other.origins[name], spiel.origins[name]) for name in spiel.origins)
    with pytest.raises(ValueError, match="growth record"):
        other.load_state_dict({"completed_steps": 1, "num_training_steps": 50, "origins": {}})


# --------------------------------------------------------------------------------------------------------------
# SM3
# --------------------------------------------------------------------------------------------------------------


def test_sm3_matches_a_hand_computation_on_row_and_column_accumulators():
    model, layer = one_layer_model(k=6, update="static")
    indices = torch.tensor([flat(0, 1), flat(0, 5), flat(2, 1), flat(3, 0), flat(3, 5), flat(7, 15)])
    layer.set_sparse_entries("default", indices.to(torch.int32))
    values = layer.sparse_values["default"]
    optimizer = SM3(model, lr=0.5, eps=1e-8)
    rows_ref, cols_ref = torch.zeros(OUT), torch.zeros(IN)
    expected = torch.zeros(6)
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):
        grad = torch.randn(6, generator=generator)
        values.grad = grad.clone()
        optimizer.step()
        # hand computation, entry by entry
        nu = torch.zeros(6)
        for i, index in enumerate(indices.tolist()):
            row, col = divmod(index, IN)
            nu[i] = min(rows_ref[row], cols_ref[col]) + grad[i] ** 2
        for i, index in enumerate(indices.tolist()):
            row, col = divmod(index, IN)
            rows_ref[row] = max(rows_ref[row], nu[i])
            cols_ref[col] = max(cols_ref[col], nu[i])
        expected -= 0.5 * grad / torch.sqrt(nu + 1e-8)
    state = optimizer.state[values]
    assert torch.allclose(state["row_accumulator"], rows_ref)
    assert torch.allclose(state["col_accumulator"], cols_ref)
    assert torch.allclose(values.detach(), expected, atol=1e-6)


def test_sm3_validates_its_arguments():
    model, _ = one_layer_model(update="static")
    with pytest.raises(ValueError, match="momentum"):
        SM3(model, momentum=1.0)
    with pytest.raises(TypeError, match="lr"):
        SM3(model, lr="fast")
    with pytest.raises(TypeError, match="nn.Module"):
        SM3([torch.zeros(3, requires_grad=True)])


def test_spiel_is_deterministic_for_a_seed():
    def run():
        model, layer = one_layer_model(k=30, update_interval=2, accumulation_steps=2, reselection_rate=0.5)
        optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=1e-2)
        spiel = SpIEL(model, optimizer, num_training_steps=12)
        generator = torch.Generator().manual_seed(9)
        for _ in range(12):
            x, target = torch.randn(4, IN, generator=generator), torch.randn(4, OUT, generator=generator)
            step(model, optimizer, spiel, x, target)
        return layer.sparse_indices["default"].clone(), layer.sparse_values["default"].detach().clone()

    (indices_a, values_a), (indices_b, values_b) = run(), run()
    assert torch.equal(indices_a, indices_b) and torch.equal(values_a, values_b)


def _windowed_run(steps, save_at=None, save_before_step=False):
    """A one-layer SpIEL-AG run on fixed batches (update at step 4, window of 3 steps). ``save_at``: hand the run
    over to a fresh :class:`SpIEL` restored from ``state_dict()`` after that step's backward (``save_before_step``)
    or after its ``step()``."""
    model, layer = one_layer_model(
        k=20, update_interval=4, accumulation_steps=3, reselection_rate=0.3, reselection_schedule="constant"
    )
    optimizer = torch.optim.AdamW([layer.sparse_values["default"]], lr=1e-2)
    spiel = SpIEL(model, optimizer, num_training_steps=50)
    generator = torch.Generator().manual_seed(6)
    for number in range(1, steps + 1):
        x, target = torch.randn(4, IN, generator=generator), torch.randn(4, OUT, generator=generator)
        (model(x) * target).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        if number == save_at and save_before_step:
            state = spiel.state_dict()
            spiel.close()
            spiel = SpIEL(model, optimizer, num_training_steps=50)
            spiel.load_state_dict(state)
        spiel.step()
        if number == save_at and not save_before_step:
            state = spiel.state_dict()
            spiel.close()
            spiel = SpIEL(model, optimizer, num_training_steps=50)
            spiel.load_state_dict(state)
    return layer.sparse_indices["default"].clone(), layer.sparse_values["default"].detach().clone(), spiel


@pytest.mark.parametrize("save_before_step", [False, True])
def test_spiel_resumed_from_inside_the_accumulation_window_continues_exactly(save_before_step):
    indices, values, spiel = _windowed_run(6)
    assert spiel.history[-1].step == 4 and spiel.history[-1].total == 6
    resumed_indices, resumed_values, _ = _windowed_run(6, save_at=3, save_before_step=save_before_step)
    assert torch.equal(resumed_indices, indices) and torch.equal(resumed_values, values)


def test_spiel_ag_sums_over_ranks_once_per_window_densely_then_once_per_step_at_the_candidates(monkeypatch):
    """Under torch.distributed SpIEL-AG averages over ranks, in the window's first backward, each layer's dense
    gradient (to choose the candidates), then, at each later optimizer step of the window, the gradient at the
    candidates (one collective for all layers). Here a stand-in second rank sees the same micro-batches, so the run
    must equal the one-process run exactly."""
    from peft_sparse.selection import spiel as spiel_module

    indices, values, _ = _windowed_run(6)
    reduced = []

    def all_reduce(tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        tensor.mul_(2)  # the sum over two ranks with identical gradients

    monkeypatch.setattr(spiel_module, "world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    two_rank_indices, two_rank_values, _ = _windowed_run(6)
    assert torch.equal(two_rank_indices, indices) and torch.equal(two_rank_values, values)
    # the update at step 4 reads the backwards of steps 2-4: the dense gradient at step 2, the 20 candidates' sums
    # after steps 3 and 4, no broadcast at the update; the next window opens with step 6's dense gradient
    assert reduced == [OUT * IN, 20, 20, OUT * IN]
