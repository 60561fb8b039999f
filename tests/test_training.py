"""SparseTrainingCallback with transformers' Trainer and TRL's SFTTrainer: selection at train begin, dynamic and
SpIEL updates on optimizer steps and checkpoint resume (multi-process runs: tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import quantised_model, tiny_llama_aligned, tiny_tokenizer
from trainer_helpers import make_trainer, sparse_log, sparse_model, sparse_state

from peft_sparse import SparseLayer, SparseTrainingCallback
from peft_sparse.tuner.indices import layer_seed, random_indices


def test_callback_selects_the_mask_at_train_begin_and_the_optimizer_trains_it(tmp_path):
    model = sparse_model(selection="gradient")
    initial = sparse_state(model)
    trainer = make_trainer(model, tmp_path, max_steps=4)
    trainer.train()
    log = sparse_log(trainer)
    assert len(log) == 1 and log[0]["step"] == 0 and log[0]["sparse/selected_entries"] > 0
    # selection's cost is logged: passes x batches forward+backward passes, and its wall time
    entry = log[0]
    assert entry["sparse/selection_passes"] >= 1 and entry["sparse/selection_batches"] >= 1
    assert entry["sparse/selection_forward_backward"] == (
        entry["sparse/selection_passes"] * entry["sparse/selection_batches"]
    )
    assert entry["sparse/selection_seconds"] > 0
    final = sparse_state(model)
    assert any(not torch.equal(final[name][0], initial[name][0]) for name in final)  # a new mask
    # ... and the optimizer trained the new values parameters (a global budget may leave some layers at k = 0)
    assert all(final[name][1].abs().sum() > 0 for name in final if final[name][1].numel())
    total = sum(indices.numel() for indices, _ in final.values())
    assert total == sum(indices.numel() for indices, _ in initial.values())  # the global budget is kept


def test_callback_leaves_a_chosen_or_random_mask_alone(tmp_path):
    from trainer_helpers import TokenData

    from peft_sparse import select_mask

    model = sparse_model(selection="gradient")
    batches = [{key: value.unsqueeze(0) for key, value in TokenData()[i].items()} for i in range(2)]
    select_mask(model, batches)
    chosen = sparse_state(model)
    trainer = make_trainer(model, tmp_path, max_steps=2)
    trainer.train()
    assert not sparse_log(trainer)
    assert all(torch.equal(sparse_state(model)[name][0], chosen[name][0]) for name in chosen)

    random_model = sparse_model(selection="random")
    trainer = make_trainer(random_model, tmp_path / "random", max_steps=2)
    trainer.train()
    assert not sparse_log(trainer)
    for name, layer in random_model.named_modules():
        if isinstance(layer, SparseLayer):
            expected = random_indices(
                layer.num_weight_entries,
                layer.sparse_indices["default"].numel(),
                torch.Generator().manual_seed(layer_seed(0, layer.layer_name)),
            )
            assert torch.equal(layer.sparse_indices["default"].long(), expected)


def test_updates_happen_on_optimizer_steps_not_micro_batches(tmp_path):
    model = sparse_model(
        selection="random", update="spiel", update_interval=3, accumulation_steps=2, reselection_rate=0.5
    )
    sizes = {name: indices.numel() for name, (indices, _) in sparse_state(model).items()}
    trainer = make_trainer(model, tmp_path, max_steps=8, gradient_accumulation_steps=2)
    trainer.train()
    log = sparse_log(trainer)
    assert [entry["step"] for entry in log] == [3, 6]
    assert all(entry["sparse/regrown"] > 0 for entry in log)
    for name, (indices, values) in sparse_state(model).items():
        assert indices.numel() == sizes[name] == values.numel()
        assert torch.all(indices[1:] > indices[:-1])


def test_dynamic_updates_run_every_interval(tmp_path):
    model = sparse_model(selection="gradient", update="dynamic", update_interval=2)
    trainer = make_trainer(model, tmp_path, max_steps=5)
    trainer.train()
    steps = [entry["step"] for entry in sparse_log(trainer)]
    assert steps == [0, 2, 4]  # selection at begin, then updates


@pytest.mark.parametrize("regrow", ["gradient", "momentum"])
def test_resumed_run_equals_uninterrupted_run(tmp_path, regrow):
    def config():
        return {
            "selection": "gradient",
            "update": "spiel",
            "regrow": regrow,
            "update_interval": 4,
            "accumulation_steps": 3,
            "reselection_rate": 0.5,
        }

    def trainer_for(model, output_dir, **args):
        trainer = make_trainer(model, output_dir, max_steps=10, **args)
        if regrow == "momentum":  # SpIEL-MA needs SM3; the Trainer uses an optimizer it is given
            from peft_sparse.optim import SM3

            trainer.optimizer = SM3(model, lr=0.05)
        return trainer

    uninterrupted = sparse_model(**config())
    trainer_for(uninterrupted, tmp_path / "a").train()
    expected = sparse_state(uninterrupted)

    first = sparse_model(**config())
    trainer_for(first, tmp_path / "b", save_strategy="steps", save_steps=6).train()
    checkpoint = tmp_path / "b" / "checkpoint-6"
    assert (checkpoint / "sparse_training_state.pt").is_file()

    resumed = sparse_model(**config())
    if regrow == "momentum":  # an optimizer built by hand must see the checkpoint's (resized) values parameters
        resumed.load_adapter(str(checkpoint), adapter_name="default")
    trainer = trainer_for(resumed, tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(checkpoint))
    # the checkpoint's history (selection at 0, update at 4), then only the step-8 update: no selection on resume
    assert [entry["step"] for entry in sparse_log(trainer)] == [0, 4, 8]
    got = sparse_state(resumed)
    for name in expected:
        assert torch.equal(got[name][0], expected[name][0]), name
        assert torch.allclose(got[name][1], expected[name][1], atol=1e-6), name


def test_sft_trainer_with_and_without_packing_on_a_4bit_model(tmp_path):
    trl = pytest.importorskip("trl", reason="trl is in the dev extra")
    datasets = pytest.importorskip("datasets")
    from peft import get_peft_model, prepare_model_for_kbit_training

    from peft_sparse import SparseConfig

    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    texts = [" ".join(words[(i * 3 + j) % len(words)] for j in range(7)) for i in range(24)]
    for packing in (False, True):
        # 64-aligned in_features: the layers left untargeted run bitsandbytes' own forward, which mis-decodes
        # narrower ones on AVX512-BF16 CPUs (tests/bnb_defects.py)
        base = quantised_model(
            tmp_path / "model",
            tiny_llama_aligned,
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch.float32,
        )
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
        model = get_peft_model(
            base,
            SparseConfig(
                target_modules=["q_proj", "v_proj", "down_proj"],
                density=0.1,
                selection="gradient",
                salience_batches=2,
                update="spiel",
                update_interval=2,
                accumulation_steps=1,
                reselection_rate=0.5,
            ),
        )
        args = trl.SFTConfig(
            output_dir=str(tmp_path / f"sft{packing}"),
            max_steps=5,
            per_device_train_batch_size=4,
            learning_rate=1e-2,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            max_length=16,
            packing=packing,
            dataset_text_field="text",
            disable_tqdm=True,
        )
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            processing_class=tiny_tokenizer(),
            train_dataset=datasets.Dataset.from_dict({"text": texts}),
            callbacks=[SparseTrainingCallback()],
        )
        trainer.train()
        assert [entry["step"] for entry in sparse_log(trainer)] == [0, 2, 4], packing
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        assert len(losses) == 5 and all(torch.isfinite(torch.tensor(losses)))


def test_an_optimizer_built_before_select_mask_trains_the_selected_entries(tmp_path):
    from trainer_helpers import TokenData

    from peft_sparse import select_mask

    model = sparse_model(selection="gradient")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batches = [{key: value.unsqueeze(0) for key, value in TokenData()[i].items()} for i in range(2)]
    select_mask(model, batches)  # resizes the values parameters in place (the global budget moves k between layers)
    trainer = make_trainer(model, tmp_path, max_steps=2)
    trainer.optimizer = optimizer
    trainer.train()
    assert any(values.any() for _, values in sparse_state(model).values())


def test_the_optimizer_follows_which_layers_selection_left_with_entries(tmp_path):
    model = sparse_model(selection="gradient", budget="local")
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    layers[0].set_sparse_entries("default", torch.empty(0, dtype=torch.int64))  # k = 0: frozen
    trainer = make_trainer(model, tmp_path, max_steps=2)
    trainer.train()  # the Trainer built its optimizer without layers[0]; the local budget gives it entries
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(layer.sparse_values["default"]) in held for layer in layers)
    assert all(layer.sparse_values["default"].any() for layer in layers)  # all trained, layers[0] included

    model = sparse_model(selection="gradient", budget="global")
    trainer = make_trainer(model, tmp_path / "global", max_steps=2)
    trainer.train()  # the global budget empties some layers: they leave the optimizer
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    empty = [layer for layer in layers if layer.sparse_values["default"].numel() == 0]
    held = [id(p) for group in trainer.optimizer.param_groups for p in group["params"]]
    assert empty and not any(id(layer.sparse_values["default"]) in held for layer in empty)
    assert len(held) == len(set(held)) == len(layers) - len(empty)


def test_an_optimizer_that_does_not_hold_the_values_is_refused(tmp_path):
    model = sparse_model(selection="random")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    layer = next(m for m in model.modules() if isinstance(m, SparseLayer))
    # what a low_cpu_mem_usage adapter load does: new Parameter objects the optimizer has never seen
    layer.sparse_values["default"] = torch.nn.Parameter(layer.sparse_values["default"].detach().clone())
    trainer = make_trainer(model, tmp_path, max_steps=2)
    trainer.optimizer = optimizer
    with pytest.raises(ValueError, match="build the optimizer afterwards"):
        trainer.train()


def test_what_a_user_does_after_dynamic_training_keeps_the_moved_out_deltas(tmp_path):
    """After dynamic updates some deltas live in the residual (moved out of the trained set): saving, loading (also as
    a second adapter), a weighted adapter, a dtype change and merging must all carry them."""
    import copy

    from peft import PeftModel
    from tiny_models import tiny_llama

    model = sparse_model(selection="gradient", update="dynamic", update_interval=2)
    make_trainer(model, tmp_path / "run", max_steps=5).train()
    model.eval()
    layers = [m for m in model.modules() if isinstance(m, SparseLayer)]
    assert sum(layer.sparse_residual_indices["default"].numel() for layer in layers) > 0
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(1))
    expected = model(ids).logits
    with model.disable_adapter():
        assert (model(ids).logits - expected).abs().max() > 1e-3  # the adapter does something

    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=1e-6)

    second = sparse_model(selection="random")
    second.load_adapter(tmp_path / "adapter", adapter_name="dynamic")
    second.set_adapter("dynamic")
    torch.testing.assert_close(second(ids).logits, expected, rtol=0, atol=1e-6)

    def merged_weights(peft_model):
        return {name: p.detach().clone() for name, p in peft_model.merge_and_unload().named_parameters()}

    base = {name: p.detach().clone() for name, p in copy.deepcopy(model).unload().named_parameters()}
    once = merged_weights(copy.deepcopy(model))
    weighted = copy.deepcopy(model)
    weighted.add_weighted_adapter(["default"], [2.0], "twice")
    weighted.set_adapter("twice")
    weighted.delete_adapter("default")
    twice = merged_weights(weighted)
    for name, weight in base.items():
        torch.testing.assert_close(twice[name] - weight, 2 * (once[name] - weight), rtol=0, atol=1e-6)

    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=0, atol=1e-5)
    half = copy.deepcopy(model).to(torch.bfloat16)
    assert all(
        layer.sparse_residual_values["default"].dtype == torch.bfloat16
        for layer in half.modules()
        if isinstance(layer, SparseLayer)
    )
    torch.testing.assert_close(half(ids).logits.float(), expected, rtol=0, atol=0.05)
