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

pytestmark = pytest.mark.slow  # every test here launches torchrun processes


GLOBAL = {"budget": "global", "select_before_wrapping": True}  # select before training: layers may get k = 0
QUANTISED = {"quantised": True, **GLOBAL}

# Every run the tests compare, by name. One process with a batch of 4 is the reference for two with a batch of 2.
RUNS: dict[str, dict] = {
    "single-global": {"engine": "single", "batch": 4, **GLOBAL},
    "single-static": {"engine": "single", "batch": 4},
    "single-dynamic": {"engine": "single", "batch": 4, "update": "dynamic"},
    "single-spiel": {"engine": "single", "batch": 4, "update": "spiel"},
    "single-sm3": {"engine": "single", "batch": 4, "update": "spiel", "regrow": "momentum", "optimizer": "sm3"},
    "single-4bit-uint8": {"engine": "single", "batch": 4, "quant_storage": "uint8", **QUANTISED},
    "single-4bit-bfloat16": {"engine": "single", "batch": 4, "quant_storage": "bfloat16", **QUANTISED},
    "single-random": {"engine": "single", "batch": 4, "selection": "random"},
    "single-7-steps": {"engine": "single", "batch": 8, "steps": 7},
    "single-spiel-7-steps": {"engine": "single", "batch": 8, "steps": 7, "update": "spiel"},
    "ddp-7-steps": {"engine": "ddp", "batch": 4, "steps": 7},
    "ddp-spiel-7-steps": {"engine": "ddp", "batch": 4, "steps": 7, "update": "spiel"},
    "ddp-global": {"engine": "ddp", "batch": 2, **GLOBAL},
    "ddp-spiel": {"engine": "ddp", "batch": 2, "update": "spiel"},
    "ddp-dynamic": {"engine": "ddp", "batch": 2, "update": "dynamic"},
    "fsdp-global": {"engine": "fsdp", "batch": 2, **GLOBAL},
    "fsdp-static": {"engine": "fsdp", "batch": 2},
    # the dynamic and SpIEL runs save checkpoints for the resume tests: indices moved at step 3, just before the
    # dynamic run's checkpoint; SpIEL's step-2 checkpoint lies inside the AG window of its step-3 update
    "fsdp-dynamic": {"engine": "fsdp", "batch": 2, "update": "dynamic", "save_steps": 3},
    "fsdp-spiel": {"engine": "fsdp", "batch": 2, "update": "spiel", "save_steps": 2},
    "fsdp-dynamic-global": {"engine": "fsdp", "batch": 2, "update": "dynamic", "save_steps": 3, **GLOBAL},
    "fsdp-sm3": {"engine": "fsdp", "batch": 2, "update": "spiel", "regrow": "momentum", "optimizer": "sm3"},
    "fsdp-4bit-uint8": {"engine": "fsdp", "batch": 2, "quant_storage": "uint8", **QUANTISED},
    "fsdp-4bit-bfloat16": {"engine": "fsdp", "batch": 2, "quant_storage": "bfloat16", **QUANTISED},
    "zero2-random": {"engine": "zero2", "batch": 2, "selection": "random"},
    "zero3-random": {"engine": "zero3", "batch": 2, "selection": "random"},
    "zero2-global": {"engine": "zero2", "batch": 2, **GLOBAL},
}
# the sparse + low-rank hybrid (r = 4): the low-rank factors train beside the entries on every engine; the FSDP2 run
# saves the checkpoint the hybrid's resume test continues from (indices moved at step 3)
HYBRID = {"r": 4}
RUNS["single-hybrid-dynamic"] = {"engine": "single", "batch": 4, "update": "dynamic", **HYBRID}
RUNS["ddp-hybrid-dynamic"] = {"engine": "ddp", "batch": 2, "update": "dynamic", **HYBRID}
RUNS["fsdp-hybrid-dynamic"] = {"engine": "fsdp", "batch": 2, "update": "dynamic", "save_steps": 3, **HYBRID}
RUNS["single-hybrid-random"] = {"engine": "single", "batch": 4, "selection": "random", **HYBRID}
for _engine in ("zero2", "zero3"):
    RUNS[f"{_engine}-hybrid-random"] = {"engine": _engine, "batch": 2, "selection": "random", **HYBRID}
RESUMED = {"dynamic": ("fsdp-dynamic", "checkpoint-3"), "spiel": ("fsdp-spiel", "checkpoint-2")}
RESUMED["dynamic-global-budget"] = ("fsdp-dynamic-global", "checkpoint-3")  # k = 0
RESUMED["hybrid-dynamic"] = ("fsdp-hybrid-dynamic", "checkpoint-3")
for _name, (_source, _checkpoint) in RESUMED.items():
    RUNS[f"{_source}-resumed"] = {**RUNS[_source], "resume": _checkpoint, "resume_from": _source}
REFUSED = {  # what ZeRO cannot run: (options, the refusal's message)
    "zero2-dynamic": ({"engine": "zero2", "update": "dynamic"}, "update='dynamic' moves entries"),
    "zero2-spiel": ({"engine": "zero2", "update": "spiel"}, "update='spiel' moves entries"),
    "zero2-gradient": (
        {"engine": "zero2", "selection": "gradient"},
        "selection='gradient' would choose the mask after DeepSpeed",
    ),
    "zero3-global": ({"engine": "zero3", **GLOBAL}, "ZeRO-3 cannot gather a parameter with no"),
}
for _name, (_options, _) in REFUSED.items():  # after the runs that must succeed in the same launch
    RUNS[_name] = {"batch": 2, **_options, "expect_error": True}
RUNS["fsdp-probe-select-mask"] = {"engine": "fsdp", "probe": "select_mask_on_shards"}  # needs the process group


class Runs:
    """Runs every entry of ``RUNS`` with the engine a test asks for, all in one launch (see ``distributed_train.py``)
    the first time one of them is needed, and hands out each run's output folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.launched: set[str] = set()
        self.failed: dict[str, str] = {}

    def launch(self, engine: str) -> None:
        plan = {name: options for name, options in RUNS.items() if options["engine"] == engine}
        processes = 1 if engine == "single" else 2
        script = [str(HERE / "distributed_train.py"), str(self.root), json.dumps(plan)]
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
        result = subprocess.run(command, env=env, check=False, capture_output=True, text=True, timeout=900)
        if result.returncode != 0:
            self.failed[engine] = result.stdout[-3000:] + result.stderr[-5000:]

    def __getitem__(self, name: str) -> Path:
        engine = RUNS[name]["engine"]
        if engine not in self.launched:  # once per engine, whatever its outcome
            self.launched.add(engine)
            self.launch(engine)
        assert engine not in self.failed, f"the {engine} launch failed:\n{self.failed[engine]}"
        return self.root / name


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


def _rank_states(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


def assert_ranks_identical(out_dir: Path) -> list[dict]:
    outputs = _rank_states(out_dir)
    for name, (indices, values) in outputs[0]["state"].items():
        assert torch.equal(outputs[1]["state"][name][0], indices), name
        assert torch.equal(outputs[1]["state"][name][1], values), name
    return outputs[0]["log"]


def _sizes(adapter: dict[str, torch.Tensor]) -> list[int]:
    return [tensor.numel() for key, tensor in adapter.items() if "sparse_values" in key]


def test_a_global_budget_that_leaves_layers_empty_trains_under_fsdp_like_one_process(runs):
    adapter = assert_same_adapter(runs["single-global"], runs["fsdp-global"])
    sizes = _sizes(adapter)
    assert 0 in sizes and sum(sizes) > 0  # the case FSDP2 used to fail on ("_chunk_cat expects non-empty tensor")
    assert_ranks_identical(runs["fsdp-global"])
    trained = [t for k, t in adapter.items() if "sparse_values" in k and t.numel()]
    assert all(bool(t.any()) for t in trained)


def test_ddp_two_processes_match_one_process_and_agree_across_ranks(runs):
    single = torch.load(runs["single-7-steps"] / "rank0.pt")["state"]
    ranks = [output["state"] for output in _rank_states(runs["ddp-7-steps"])]
    for name in single:
        assert torch.equal(ranks[0][name][0], ranks[1][name][0]), name  # identical selection on both ranks
        assert torch.equal(ranks[0][name][1], ranks[1][name][1]), name
        assert torch.equal(ranks[0][name][0], single[name][0]), name  # the same mask as one process
        assert torch.allclose(ranks[0][name][1], single[name][1], rtol=1e-4, atol=1e-6), name


def test_ddp_spiel_reselection_matches_one_process_and_keeps_ranks_identical(runs):
    """Two SpIEL-AG updates (steps 3 and 6), each regrowing from the gradient of both ranks' micro-batches."""
    log = assert_ranks_identical(runs["ddp-spiel-7-steps"])
    assert [entry["step"] for entry in log] == [0, 3, 6] and all(entry["sparse/regrown"] > 0 for entry in log[1:])
    single = torch.load(runs["single-spiel-7-steps"] / "rank0.pt")["state"]
    ranks = torch.load(runs["ddp-spiel-7-steps"] / "rank0.pt")["state"]
    for name, (indices, values) in single.items():
        assert torch.equal(ranks[name][0], indices), name
        torch.testing.assert_close(ranks[name][1], values, rtol=1e-4, atol=1e-6, msg=name)


def test_a_global_budget_that_leaves_layers_empty_trains_under_ddp_like_one_process(runs):
    assert 0 in _sizes(assert_same_adapter(runs["single-global"], runs["ddp-global"]))
    assert_ranks_identical(runs["ddp-global"])


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


def test_selection_at_train_begin_under_fsdp_matches_one_process(runs):
    assert_same_adapter(runs["single-static"], runs["fsdp-static"])
    log = assert_ranks_identical(runs["fsdp-static"])
    assert [entry["step"] for entry in log] == [0]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_dynamic_mask_updates_under_ddp_and_fsdp_match_one_process(runs, engine):
    """``update_mask`` re-runs the salience passes on each rank's micro-batches and sums the dense accumulators over
    ranks before the top-k, so two ranks reselect what one process does on the whole batch."""
    distributed = runs[f"{engine}-dynamic"]
    adapter = assert_same_adapter(runs["single-dynamic"], distributed)
    log = assert_ranks_identical(distributed)
    assert [entry["step"] for entry in log] == [0, 3]
    assert log[1]["sparse/moved"] > 0
    assert any(t.numel() for k, t in adapter.items() if "sparse_residual_values" in k)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_spiel_with_accumulated_gradients_under_ddp_and_fsdp_matches_one_process(runs, engine):
    """SpIEL-AG's candidates and their accumulated gradients come from the global batch (both ranks'
    micro-batches), so two ranks regrow what one process does on the whole batch."""
    distributed = runs[f"{engine}-spiel"]
    assert_same_adapter(runs["single-spiel"], distributed)
    log = assert_ranks_identical(distributed)
    assert [entry["step"] for entry in log] == [0, 3] and log[1]["sparse/regrown"] > 0


def _low_rank_factors(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: tensor for key, tensor in adapter.items() if "sparse_lora_" in key}


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_the_sparse_low_rank_hybrid_with_mask_updates_under_ddp_and_fsdp_matches_one_process(runs, engine):
    """The low-rank factors are plain parameters beside the values: DDP averages and FSDP2 shards them as any, and
    the mask update at step 3 leaves them (and their optimizer state) alone."""
    distributed = runs[f"{engine}-hybrid-dynamic"]
    adapter = assert_same_adapter(runs["single-hybrid-dynamic"], distributed)
    factors = _low_rank_factors(adapter)
    assert len(factors) == 2 * len(_sizes(adapter)) > 0  # an A and a B per targeted layer, saved from the shards
    assert all(bool(t.any()) for k, t in factors.items() if "lora_B" in k)  # B starts at zero: it trained
    log = assert_ranks_identical(distributed)
    assert [entry["step"] for entry in log] == [0, 3] and log[1]["sparse/moved"] > 0


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_the_sparse_low_rank_hybrid_under_deepspeed_zero_matches_one_process(runs, engine):
    pytest.importorskip("deepspeed")
    adapter = assert_same_adapter(runs["single-hybrid-random"], runs[f"{engine}-hybrid-random"])
    assert all(bool(t.any()) for k, t in _low_rank_factors(adapter).items() if "lora_B" in k)


def test_spiel_with_sm3_momenta_under_fsdp_matches_one_process(runs):
    assert_same_adapter(runs["single-sm3"], runs["fsdp-sm3"])
    log = assert_ranks_identical(runs["fsdp-sm3"])
    assert log[1]["sparse/regrown"] > 0


@pytest.mark.parametrize("resumed", list(RESUMED))
def test_resuming_from_an_fsdp_checkpoint_continues_the_run_exactly(runs, resumed):
    source, checkpoint = RESUMED[resumed]
    assert (runs[source] / "run" / checkpoint).is_dir()
    assert_same_adapter(runs[source], runs[f"{source}-resumed"], atol=0.0)


@pytest.mark.parametrize("quant_storage", ["uint8", "bfloat16"])
def test_a_4bit_base_under_fsdp_matches_one_process_and_merges(runs, quant_storage):
    """uint8 storage: accelerate leaves the packed weights out of FSDP (replicated); bfloat16 storage
    (FSDP-QLoRA's setting): FSDP shards the packed 4-bit weights like any parameter."""
    from peft import PeftModel
    from tiny_models import quantised_model, tiny_llama_aligned

    fsdp = runs[f"fsdp-4bit-{quant_storage}"]
    adapter = assert_same_adapter(runs[f"single-4bit-{quant_storage}"], fsdp)
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


def test_select_mask_on_an_fsdp_model_refuses_to_move_the_budget_between_layers(runs):
    """Values sharded by ``fully_shard`` are DTensors whose layout fixes each layer's k (both ranks report)."""
    for rank in (0, 1):
        result = json.loads((runs["fsdp-probe-select-mask"] / f"probe-rank{rank}.json").read_text())
        assert result["refused"].startswith("select_mask: the values are sharded by FSDP2"), result
        assert result["kept"]


# ---------------------------------------------------------------------------------------------------------------
# DeepSpeed ZeRO (its CPU accelerator, gloo): static masks; what ZeRO cannot run is refused at train begin
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_a_static_mask_under_deepspeed_zero_matches_one_process(runs, engine):
    pytest.importorskip("deepspeed")
    assert_same_adapter(runs["single-random"], runs[f"{engine}-random"])


def test_a_mask_selected_before_training_with_empty_layers_under_zero2_matches_one_process(runs):
    pytest.importorskip("deepspeed")
    assert 0 in _sizes(assert_same_adapter(runs["single-global"], runs["zero2-global"]))


@pytest.mark.parametrize("refused", list(REFUSED))
def test_what_deepspeed_zero_cannot_run_is_refused_at_train_begin(runs, refused):
    pytest.importorskip("deepspeed")
    message = REFUSED[refused][1]
    for rank in (0, 1):
        record = runs[refused] / f"error-rank{rank}.json"
        assert record.exists(), f"{refused} was not refused on rank {rank}"
        error = json.loads(record.read_text())
        assert f"SparseTrainingCallback under DeepSpeed ZeRO: {message}" in error["message"]
        assert error["steps"] == 0  # refused before the first optimizer step
