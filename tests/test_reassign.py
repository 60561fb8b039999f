"""In-place index rewrites (dynamic masks, SpIEL): values and optimizer moments follow surviving entries."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from tiny_models import VOCAB, tiny_llama

from peft_sparse import SparseConfig
from peft_sparse.selection import reassign_entries
from peft_sparse.tuner.layer import SparseLayer


def _model_and_layer():
    model = get_peft_model(tiny_llama(seed=2), SparseConfig(target_modules=["q_proj"], density=0.1))
    layer = next(m for m in model.modules() if isinstance(m, SparseLayer))
    return model, layer


def _train(model, optimizer, steps=3):
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("optimizer_cls", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
def test_surviving_entries_keep_values_and_moments_new_ones_start_at_zero(optimizer_cls):
    model, layer = _model_and_layer()
    kwargs = {"lr": 1e-2, "momentum": 0.9} if optimizer_cls is torch.optim.SGD else {"lr": 1e-2}
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **kwargs)
    _train(model, optimizer)
    values = layer.sparse_values["default"]
    old = layer.sparse_indices["default"].long().clone()
    before_values = dict(zip(old.tolist(), values.detach().clone().tolist()))
    state_before = {
        key: dict(zip(old.tolist(), t.clone().tolist()))
        for key, t in optimizer.state[values].items()
        if isinstance(t, torch.Tensor) and t.dim() > 0
    }
    assert state_before, "the optimizer kept no per-entry state"
    # keep every other old entry, replace the rest by unused positions
    keep = old[::2]
    unused = torch.tensor(sorted(set(range(layer.num_weight_entries)) - set(old.tolist())))[
        : old.numel() - keep.numel()
    ]
    new = torch.cat([keep, unused]).sort().values

    changed = reassign_entries(layer, "default", new, optimizer)

    assert changed == unused.numel()
    assert layer.sparse_values["default"] is values  # same Parameter object: the optimizer stays valid
    assert torch.equal(layer.sparse_indices["default"].long(), new)
    for position, index in enumerate(new.tolist()):
        expected = before_values.get(index, 0.0)
        assert values[position].item() == expected
        for key, table in state_before.items():
            assert optimizer.state[values][key][position].item() == table.get(index, 0.0)
    _train(model, optimizer, steps=1)  # the optimizer still steps


def test_model_function_is_unchanged_when_only_zero_entries_move():
    model, layer = _model_and_layer()
    ids = torch.randint(0, VOCAB, (1, 5))
    before = model(input_ids=ids).logits
    old = layer.sparse_indices["default"].long()
    free = torch.tensor(sorted(set(range(layer.num_weight_entries)) - set(old.tolist())))[: old.numel()]
    reassign_entries(layer, "default", free.sort().values)  # all values are zero: nothing learned is dropped
    assert torch.equal(model(input_ids=ids).logits, before)


def test_reassign_rejects_bad_sets_without_changing_anything():
    _, layer = _model_and_layer()
    old = layer.sparse_indices["default"].clone()
    with pytest.raises(ValueError, match="k must stay fixed"):
        reassign_entries(layer, "default", old[:-1].long())
    with pytest.raises(ValueError, match="sorted and unique"):
        reassign_entries(layer, "default", old.long().flip(0))
    with pytest.raises(ValueError, match="must lie in"):
        reassign_entries(layer, "default", torch.full_like(old.long(), layer.num_weight_entries))
    assert torch.equal(layer.sparse_indices["default"], old)


def test_unsupported_optimizer_state_layout_raises():
    _, layer = _model_and_layer()
    values = layer.sparse_values["default"]
    optimizer = torch.optim.Adam([values])
    optimizer.state[values]["quantised_moment"] = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(NotImplementedError, match="quantised_moment"):
        reassign_entries(layer, "default", layer.sparse_indices["default"].long(), optimizer)


@pytest.mark.parametrize("optimizer_name", ["AdamW8bit", "Adam8bit"])
def test_bitsandbytes_8bit_moments_are_remapped_to_within_8bit_rounding(optimizer_name):
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is in the dev extra")
    import bitsandbytes.functional as bnb_functional
    from torch import nn

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(128, 128, bias=False)

        def forward(self, x):
            return self.proj(x)

    # 8192 entries: above bitsandbytes' 4096-element minimum for 8-bit (blockwise) state
    model = get_peft_model(Wide(), SparseConfig(target_modules=["proj"], density=0.5))
    layer = next(m for m in model.modules() if isinstance(m, SparseLayer))
    values = layer.sparse_values["default"]
    optimizer = getattr(bnb.optim, optimizer_name)([values], lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        (model(torch.randn(16, 128, generator=generator)) ** 2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state[values]
    assert state["state1"].dtype == torch.uint8  # really the quantised layout

    def moments():
        return [
            bnb_functional.dequantize_blockwise(
                state[f"state{i}"], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256
            )
            for i in (1, 2)
        ]

    old = layer.sparse_indices["default"].long().clone()
    before = moments()
    # swap a quarter of the entries for positions outside the current set
    free = torch.ones(128 * 128, dtype=torch.bool)
    free[old] = False
    incoming = torch.nonzero(free).flatten()[torch.randperm(int(free.sum()), generator=generator)[:2048]]
    keep = old[torch.randperm(old.numel(), generator=generator)[: old.numel() - 2048]]
    new = torch.sort(torch.cat([keep, incoming])).values
    assert reassign_entries(layer, "default", new, optimizer) == 2048
    after = moments()
    survived = torch.isin(new, old)
    old_position = torch.searchsorted(old, new[survived])
    for moment_before, moment_after in zip(before, after):
        # zero to the code map's resolution (bitsandbytes' unsigned dynamic map has no exact zero code)
        assert moment_after[~survived].abs().max() <= 1e-4 * moment_before.abs().max()
        expected = moment_before[old_position]
        error = (moment_after[survived] - expected).abs().max() / expected.abs().max()
        assert error < 0.02, error
