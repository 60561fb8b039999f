"""Distributed training on CPU over gloo against one process: FSDP2 (``fully_shard`` through accelerate, as
``Trainer`` drives it), DDP and DeepSpeed ZeRO.

Every test launches ``distributed_train.py`` (see its docstring for how accelerate's FSDP2 and DeepSpeed paths are
driven on CPU) on two processes with a per-process batch of 2 and compares with one process and a batch of 4: the
same global batches, so the adapter ``trainer.save_model`` writes (the full state gathered from the shards) must be
the same file, indices exactly, values to float32 rounding, and both ranks must hold identical (gathered) adapters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from trainer_helpers import free_port

HERE = Path(__file__).resolve().parent


class Runs:
    """Launches ``distributed_train.py`` once per distinct set of options and remembers where its outputs are."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: dict[str, Path] = {}
        self.launched = 0

    def __call__(self, resume_from: Path | None = None, expect_error: bool = False, **options) -> Path | str:
        """Run once per set of options; returns the output folder, or with ``expect_error`` the failed run's
        output (asserting that it failed)."""
        key = json.dumps(options, sort_keys=True) + str(resume_from)
        if key in self.done:
            return self.done[key]
        self.launched += 1
        out_dir = self.root / f"run{self.launched}"
        out_dir.mkdir(parents=True)
        if resume_from is not None:  # the checkpoint to resume from, where the Trainer looks for it
            checkpoint = resume_from / "run" / options["resume"]
            (out_dir / "run").mkdir()
            subprocess.run(["cp", "-r", str(checkpoint), str(out_dir / "run")], check=True)
        processes = 1 if options.get("engine", "single") == "single" else 2
        script = [str(HERE / "distributed_train.py"), str(out_dir), json.dumps(options)]
        if processes == 1:
            command = [sys.executable, *script]
        else:
            command = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nproc_per_node={processes}",
                f"--master_port={free_port()}",
                *script,
            ]
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            DS_ACCELERATOR="cpu",
            PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        )
        result = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=600)
        if expect_error:
            assert result.returncode != 0, "the run was expected to fail"
            return result.stdout + result.stderr
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        self.done[key] = out_dir
        return out_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("distributed"))


def _adapter(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(expected_dir: Path, actual_dir: Path, atol: float = 1e-6) -> dict[str, torch.Tensor]:
    expected, actual = _adapter(expected_dir), _adapter(actual_dir)
    assert expected.keys() == actual.keys()
    for key, tensor in expected.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(actual[key], tensor, rtol=1e-4, atol=atol, msg=key)
        else:
            assert torch.equal(actual[key], tensor), key
    return expected


def assert_ranks_identical(out_dir: Path) -> list[dict]:
    outputs = [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]
    for name, (indices, values) in outputs[0]["state"].items():
        assert torch.equal(outputs[1]["state"][name][0], indices), name
        assert torch.equal(outputs[1]["state"][name][1], values), name
    return outputs[0]["log"]


def _sizes(adapter: dict[str, torch.Tensor]) -> list[int]:
    return [tensor.numel() for key, tensor in adapter.items() if "sparse_values" in key]


def test_a_global_budget_that_leaves_layers_empty_trains_under_fsdp_like_one_process(runs):
    options = {"budget": "global", "select_before_wrapping": True}
    adapter = assert_same_adapter(runs(engine="single", batch=4, **options), runs(engine="fsdp", batch=2, **options))
    sizes = _sizes(adapter)
    assert 0 in sizes and sum(sizes) > 0  # the case FSDP2 used to fail on ("_chunk_cat expects non-empty tensor")
    assert_ranks_identical(runs(engine="fsdp", batch=2, **options))
    trained = [t for k, t in adapter.items() if "sparse_values" in k and t.numel()]
    assert all(bool(t.any()) for t in trained)


def _rank_states(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def test_ddp_two_processes_match_one_process_and_agree_across_ranks(runs):
    single = torch.load(runs(engine="single", batch=8, steps=7) / "rank0.pt")["state"]
    ranks = [output["state"] for output in _rank_states(runs(engine="ddp", batch=4, steps=7))]
    for name in single:
        assert torch.equal(ranks[0][name][0], ranks[1][name][0]), name  # identical selection on both ranks
        assert torch.equal(ranks[0][name][1], ranks[1][name][1]), name
        assert torch.equal(ranks[0][name][0], single[name][0]), name  # the same mask as one process
        assert torch.allclose(ranks[0][name][1], single[name][1], rtol=1e-4, atol=1e-6), name


def test_ddp_spiel_reselection_keeps_ranks_identical(runs):
    outputs = _rank_states(runs(engine="ddp", batch=4, steps=7, update="spiel"))
    assert [entry["step"] for entry in outputs[0]["log"]] == [0, 3, 6]
    for name in outputs[0]["state"]:
        for part in (0, 1):
            assert torch.equal(outputs[0]["state"][name][part], outputs[1]["state"][name][part]), name


def test_a_global_budget_that_leaves_layers_empty_trains_under_ddp_like_one_process(runs):
    options = {"budget": "global", "select_before_wrapping": True}
    ddp = runs(engine="ddp", batch=2, **options)
    assert 0 in _sizes(assert_same_adapter(runs(engine="single", batch=4, **options), ddp))
    assert_ranks_identical(ddp)


def test_an_empty_layer_is_frozen_and_gets_no_gradient_until_it_has_entries():
    from trainer_helpers import TokenData, sparse_model

    from peft_sparse import SparseLayer, select_mask

    model = sparse_model(selection="gradient", budget="global")
    batches = [{key: value.unsqueeze(0) for key, value in TokenData()[i].items()} for i in range(2)]
    select_mask(model, batches)
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    empty = [m for m in layers if m.sparse_values["default"].numel() == 0]
    assert empty and len(empty) < len(layers)
    model.base_model.set_adapter("default")  # peft marks the adapter trainable again: the empty values stay frozen
    model(**batches[0]).loss.backward()
    for layer in layers:
        values = layer.sparse_values["default"]
        assert values.requires_grad == (values.numel() > 0), layer.layer_name
        assert (values.grad is None) == (values.numel() == 0), layer.layer_name
    empty[0].requires_grad_(True)  # even switched on by hand, an empty layer produces no (empty) gradient
    model(**batches[0]).loss.backward()
    assert empty[0].sparse_values["default"].grad is None
    # given entries, a layer takes back the trainability peft asked for while it was empty
    empty[0].reset_random("default", 5, seed=0)
    assert empty[0].sparse_values["default"].requires_grad
    empty[1].set_adapter("default", inference_mode=True)  # frozen on purpose: stays frozen once sized
    empty[1].reset_random("default", 5, seed=0)
    assert not empty[1].sparse_values["default"].requires_grad


@pytest.mark.parametrize("update", ["static", "dynamic"])
def test_selection_at_train_begin_and_dynamic_updates_under_fsdp_match_one_process(runs, update):
    single = runs(engine="single", batch=4, update=update)
    fsdp = runs(engine="fsdp", batch=2, update=update)
    adapter = assert_same_adapter(single, fsdp)
    log = assert_ranks_identical(fsdp)
    assert [entry["step"] for entry in log] == ([0] if update == "static" else [0, 3])
    if update == "dynamic":
        assert log[1]["sparse/moved"] > 0
        assert any(t.numel() for k, t in adapter.items() if "sparse_residual_values" in k)


def test_spiel_with_accumulated_gradients_under_fsdp_equals_ddp(runs):
    # SpIEL-AG regrows from rank 0's micro-batches (as under DDP), so the reference is DDP, not one process.
    ddp, fsdp = runs(engine="ddp", batch=2, update="spiel"), runs(engine="fsdp", batch=2, update="spiel")
    assert_same_adapter(ddp, fsdp)
    log = assert_ranks_identical(fsdp)
    assert [entry["step"] for entry in log] == [0, 3] and log[1]["sparse/regrown"] > 0


def test_spiel_with_sm3_momenta_under_fsdp_matches_one_process(runs):
    options = {"update": "spiel", "regrow": "momentum", "optimizer": "sm3"}
    fsdp = runs(engine="fsdp", batch=2, **options)
    assert_same_adapter(runs(engine="single", batch=4, **options), fsdp)
    log = assert_ranks_identical(fsdp)
    assert log[1]["sparse/regrown"] > 0


@pytest.mark.parametrize(
    ("options", "resume"),
    [
        (
            {"update": "dynamic", "save_steps": 3},
            "checkpoint-3",
        ),  # indices moved at step 3, just before the checkpoint
        ({"update": "spiel", "save_steps": 2}, "checkpoint-2"),  # inside SpIEL-AG's window for the step-3 update
        (
            {"update": "dynamic", "save_steps": 3, "budget": "global", "select_before_wrapping": True},
            "checkpoint-3",
        ),  # k = 0
    ],
    ids=["dynamic", "spiel", "dynamic-global-budget"],
)
def test_resuming_from_an_fsdp_checkpoint_continues_the_run_exactly(runs, options, resume):
    full = runs(engine="fsdp", batch=2, **options)
    resumed = runs(engine="fsdp", batch=2, resume=resume, resume_from=full, **options)
    assert_same_adapter(full, resumed, atol=0.0)


@pytest.mark.parametrize("quant_storage", ["uint8", "bfloat16"])
def test_a_4bit_base_under_fsdp_matches_one_process_and_merges(runs, quant_storage):
    """uint8 storage: accelerate leaves the packed weights out of FSDP (replicated); bfloat16 storage
    (FSDP-QLoRA's setting): FSDP shards the packed 4-bit weights like any parameter."""
    from peft import PeftModel
    from tiny_models import quantised_model, tiny_llama_aligned

    options = {"quantised": True, "quant_storage": quant_storage, "budget": "global", "select_before_wrapping": True}
    fsdp = runs(engine="fsdp", batch=2, **options)
    adapter = assert_same_adapter(runs(engine="single", batch=4, **options), fsdp)
    assert 0 in _sizes(adapter)
    assert_ranks_identical(fsdp)
    # After training: the adapter saved from the shards loads on one process and merges into the 4-bit base.
    base = quantised_model(
        fsdp / "merge-base",
        tiny_llama_aligned,
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=getattr(torch, quant_storage),
    )
    # (train mode: bitsandbytes' eval-mode CPU forward of the untargeted layers repacks their weights lossily on
    # AVX512-BF16 CPUs; the merged layers compute through our decode either way)
    model = PeftModel.from_pretrained(base, str(fsdp / "adapter")).train()
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert (adapted - plain).abs().max() > 1e-4  # the trained delta changes the output
    # The merge re-quantises W0 + delta to the 4-bit grid: far closer to the adapted model than the base is.
    assert (merged - adapted).abs().max() < 0.5 * (adapted - plain).abs().max()


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (its CPU accelerator, gloo): static masks; what ZeRO cannot run is refused at train begin
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_a_static_mask_under_deepspeed_zero_matches_one_process(runs, engine):
    pytest.importorskip("deepspeed")
    options = {"budget": "local", "selection": "random"}
    assert_same_adapter(runs(engine="single", batch=4, **options), runs(engine=engine, batch=2, **options))


def test_a_mask_selected_before_training_with_empty_layers_under_zero2_matches_one_process(runs):
    pytest.importorskip("deepspeed")
    options = {"budget": "global", "select_before_wrapping": True}
    adapter = assert_same_adapter(runs(engine="single", batch=4, **options), runs(engine="zero2", batch=2, **options))
    assert 0 in _sizes(adapter)


@pytest.mark.parametrize(
    ("engine", "options", "message"),
    [
        ("zero2", {"update": "dynamic"}, "update='dynamic' moves entries"),
        ("zero2", {"update": "spiel"}, "update='spiel' moves entries"),
        ("zero2", {"selection": "gradient"}, "selection='gradient' would choose the mask after DeepSpeed"),
        ("zero3", {"budget": "global", "select_before_wrapping": True}, "ZeRO-3 cannot gather a parameter with no"),
    ],
)
def test_what_deepspeed_zero_cannot_run_is_refused_at_train_begin(runs, engine, options, message):
    pytest.importorskip("deepspeed")
    output = runs(engine=engine, batch=2, expect_error=True, **options)
    assert f"SparseTrainingCallback under DeepSpeed ZeRO: {message}" in output
    assert "'loss'" not in output  # refused before the first optimizer step


def test_select_mask_on_an_fsdp_model_refuses_to_move_the_budget_between_layers(tmp_path):
    """One gloo process is enough to shard: values become DTensors whose layout fixes each layer's k."""
    script = f"""
import sys, torch
sys.path.insert(0, {str(HERE)!r})
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from trainer_helpers import TokenData, sparse_model
from peft_sparse import SparseLayer, select_mask
dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=0, world_size=1)
model = sparse_model(selection="gradient", budget="global")
fully_shard(model)
batches = [{{key: value.unsqueeze(0) for key, value in TokenData()[i].items()}} for i in range(2)]
try:
    select_mask(model, batches)
except ValueError as error:
    print("REFUSED:", error)
sizes = [m.sparse_values["default"].shape[0] for m in model.modules() if isinstance(m, SparseLayer)]
select_mask(model, batches, keep_layer_sizes=True)
assert [m.sparse_values["default"].shape[0] for m in model.modules() if isinstance(m, SparseLayer)] == sizes
print("KEPT")
dist.destroy_process_group()
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REFUSED: select_mask: the values are sharded by FSDP2" in result.stdout
    assert "KEPT" in result.stdout
