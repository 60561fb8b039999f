"""`benchmarks/memory_model.py`, which predicts selection's memory and time for Llama-3-8B and -70B, held to what
the library does: the chosen entries a per-layer budget keeps, and the decoder blocks block replay runs when layer
groups split them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_models import count_block_forwards, llama_of_width

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import memory_model

from peft_sparse import SparseConfig, select_mask
from peft_sparse.selection import select
from peft_sparse.tuner.budget import allocate_budget


def test_steps_per_batch_by_groups_and_replayed_blocks():
    per_batch = memory_model.step_equivalents_per_batch
    assert per_batch(0) == 0.0 and per_batch(1) == pytest.approx(4 / 3) and per_batch(2) == 2.0
    assert per_batch(5) == pytest.approx(7 / 3)  # replay, no block split between groups
    assert per_batch(8, replayed_blocks=8, blocks=4) == pytest.approx(1 + 8 / 3)  # every block replayed twice


@pytest.mark.parametrize("layers_per_pass", [7, 4, 3])
def test_the_model_counts_the_blocks_replay_runs(layers_per_pass):
    """Groups of ``layers_per_pass`` of the 28 linear layers of a 4-block Llama: every block runs once per batch in
    the recording and once in each group's replay that spans it, as ``block_spans`` counts."""
    model = get_peft_model(
        llama_of_width(32, 48, num_hidden_layers=4).train(),
        SparseConfig(target_modules="all-linear", density=0.05, selection="gradient"),
    )
    calls = count_block_forwards(model)
    torch.manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(0, 64, (2, 8))), "labels": ids} for _ in range(2)]
    report = select_mask(model, batches, layers_per_pass=layers_per_pass)
    assert report.replayed and report.replay_recordings == 1
    groups = [min(layers_per_pass, 28 - start) for start in range(0, 28, layers_per_pass)]
    spans = memory_model.block_spans(groups, per_block=7)
    replayed = sum(top - low + 1 for low, top in spans)
    assert sum(calls) == (4 + replayed) * len(batches), (calls, spans)
    assert replayed == {7: 4, 4: 10, 3: 12}[layers_per_pass]
    # the report counts the same work in whole-model passes: the recording's, and the replays' blocks over 4
    assert (report.replayed_blocks, report.decoder_blocks) == (replayed, 4)
    assert report.forward_backward_passes == -(-sum(calls) // 4)


def test_the_chosen_entries_of_a_per_layer_budget_are_what_select_mask_reserves():
    shape = memory_model.SHAPES["Llama-3-8B"]
    k = memory_model.lora_count(shape, 16)
    sizes = [out * inp for out, inp in memory_model.linear_shapes(shape)] * shape["layers"]
    counts = allocate_budget(sizes, 0.01, k, "local")
    predicted = memory_model.selection(shape, k, 0, None, 16)["selection_components"]
    reserve = next(value for name, value in predicted.items() if name.startswith("chosen entries"))
    assert reserve == pytest.approx(select._candidate_bytes(counts, one_top_k=False), rel=1e-3)
    global_reserve = memory_model.selection(shape, k, 0, None, 16, one_top_k=True)["selection_components"]
    assert next(v for n, v in global_reserve.items() if n.startswith("chosen")) == select._candidate_bytes(
        counts, one_top_k=True
    )
