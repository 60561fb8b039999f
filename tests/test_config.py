"""SparseConfig defaults and validation: every invalid field raises, naming the field and the value."""

from __future__ import annotations

import ast
import dataclasses
import re

import pytest
import torch
from peft import get_peft_model
from tiny_models import tiny_llama

from peft_sparse import SparseConfig
from peft_sparse.tuner.lookup import sparse_layers


def test_the_documented_defaults_are_the_fields_defaults():
    """Where the docstring states a default (``value`` (default ...), the field has that default."""
    fields = {f.name: f for f in dataclasses.fields(SparseConfig)}
    sections = re.split(r"\n {8}(\w+) \(`", SparseConfig.__doc__)[1:]
    stated = {}
    for name, text in zip(sections[::2], sections[1::2]):
        match = re.search(r"``([^`]+)`` \(default", text)
        if match:
            stated[name] = ast.literal_eval(match.group(1))
    assert len(stated) >= 4, stated  # reselection_schedule, delta_dtype, init_weights, r
    for name, value in stated.items():
        assert fields[name].default == value, f"SparseConfig.{name}: documented {value!r}, is {fields[name].default!r}"


def test_a_default_config_is_valid_and_round_trips_through_save_and_load(tmp_path):
    config = SparseConfig(target_modules=["q_proj"])
    config.save_pretrained(tmp_path)
    loaded = SparseConfig.from_pretrained(tmp_path)
    assert loaded.to_dict() == config.to_dict()
    assert loaded.torch_delta_dtype is None  # left to peft's autocast_adapter_dtype rule


def test_delta_dtype_names_the_torch_dtype_of_the_values():
    for name in ("float32", "bfloat16", "float16"):
        assert SparseConfig(delta_dtype=name).torch_delta_dtype is getattr(torch, name)


def test_every_field_is_documented():
    for f in dataclasses.fields(SparseConfig):
        assert f.metadata.get("help"), f"SparseConfig.{f.name} has no help text"
    own = {f.name for f in dataclasses.fields(SparseConfig)} - {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
    }
    for name in own:
        assert f"{name} (`" in SparseConfig.__doc__, f"SparseConfig docstring does not document {name}"


def test_list_targets_become_sets():
    config = SparseConfig(target_modules=["q_proj", "v_proj"], exclude_modules=["x"])
    assert config.target_modules == {"q_proj", "v_proj"}
    assert config.exclude_modules == {"x"}
    assert SparseConfig(target_modules="all-linear").target_modules == "all-linear"


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"density": 0.0}, ValueError, r"density.*0\.0"),
        ({"density": -0.1}, ValueError, r"density.*-0\.1"),
        ({"density": 1.5}, ValueError, r"density.*1\.5"),
        ({"density": float("nan")}, ValueError, r"density.*nan"),
        ({"density": "0.1"}, TypeError, r"density.*'0\.1'"),
        ({"num_tunable_weights": -5}, ValueError, r"num_tunable_weights.*-5"),
        ({"num_tunable_weights": 2.5}, TypeError, r"num_tunable_weights.*2\.5"),
        ({"budget": "per-layer"}, ValueError, r"budget.*'per-layer'"),
        ({"selection": "grad"}, ValueError, r"selection.*'grad'"),
        ({"update": "sometimes"}, ValueError, r"update.*'sometimes'"),
        ({"regrow": "magic"}, ValueError, r"regrow.*'magic'"),
        ({"reselection_schedule": "step"}, ValueError, r"reselection_schedule.*'step'"),
        ({"delta_dtype": "float64"}, ValueError, r"delta_dtype.*'float64'"),
        ({"update_interval": 0}, ValueError, r"update_interval.*0"),
        ({"salience_batches": 0}, ValueError, r"salience_batches.*0"),
        ({"accumulation_steps": 0}, ValueError, r"accumulation_steps.*0"),
        ({"reselection_rate": 1.2}, ValueError, r"reselection_rate.*1\.2"),
        ({"reselection_rate": -0.1}, ValueError, r"reselection_rate.*-0\.1"),
        ({"seed": -1}, ValueError, r"seed.*-1"),
        ({"seed": True}, TypeError, r"seed.*True"),
        ({"target_modules": 3}, TypeError, r"target_modules.*3"),
        ({"target_modules": ".*q_proj", "layers_to_transform": [0]}, ValueError, r"layers_to_transform"),
        ({"target_modules": ["q_proj"], "layers_pattern": "layers"}, ValueError, r"layers_pattern"),
        (
            {"update": "spiel", "update_interval": 4, "accumulation_steps": 5},
            ValueError,
            r"accumulation_steps \(5\).*update_interval \(4\)",
        ),
    ],
)
def test_invalid_values_raise_naming_field_and_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        SparseConfig(**kwargs)


def test_the_selection_choices_agree_everywhere_they_are_listed():
    """A metric added in one place (the config's tuple, its ``Literal`` type, the metric table) and not the others
    would be refused by one layer and accepted by another."""
    import typing

    from peft_sparse.selection.salience import METRICS
    from peft_sparse.tuner.config import SELECTION_METHODS

    literal = typing.get_type_hints(SparseConfig)["selection"]
    assert set(typing.get_args(literal)) == set(SELECTION_METHODS) == set(METRICS)
    default = {f.name: f.default for f in dataclasses.fields(SparseConfig)}["selection"]
    assert default in METRICS


def test_spiel_ag_window_defaults_to_at_most_five_steps_within_the_interval():
    """One rule, in the config: ``accumulation_steps=None`` means ``min(5, update_interval)`` (the commands no longer
    compute it), and an explicit value beyond the interval is still refused."""
    assert SparseConfig(target_modules=["q_proj"]).effective_accumulation_steps == 5
    short = SparseConfig(target_modules=["q_proj"], update="spiel", update_interval=3)
    assert short.accumulation_steps is None and short.effective_accumulation_steps == 3
    assert (
        SparseConfig(target_modules=["q_proj"], update_interval=3, accumulation_steps=2).effective_accumulation_steps
        == 2
    )
    with pytest.raises(ValueError, match=r"accumulation_steps \(4\).*update_interval \(3\)"):
        SparseConfig(target_modules=["q_proj"], update="spiel", update_interval=3, accumulation_steps=4)


# --- budgets and configs -------------------------------------------------------------------------------------------
def test_num_tunable_weights_zero_is_refused():
    with pytest.raises(ValueError, match=r"num_tunable_weights must be >= 1, got 0"):
        SparseConfig(target_modules=["q_proj"], num_tunable_weights=0)


@pytest.mark.parametrize("budget", ["global", "local"])
def test_density_that_rounds_to_no_entry_is_refused_and_nothing_is_injected(budget):
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"density=1e-07 gives 0 trainable entries over the \d+ weights"):
        get_peft_model(base, SparseConfig(target_modules=["q_proj"], density=1e-7, budget=budget))
    assert not sparse_layers(base)


def test_a_config_mutated_after_construction_is_validated_at_injection():
    config = SparseConfig(target_modules=["q_proj"], density=0.05)
    config.density = 5.0
    base = tiny_llama()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\], got 5\.0"):
        get_peft_model(base, config)
    assert not sparse_layers(base)
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"], density=0.05))
    config.density, config.selection = 0.05, "gradients"
    with pytest.raises(ValueError, match=r"selection must be one of .* got 'gradients'"):
        model.add_adapter("other", config)
    assert "other" not in model.peft_config
    assert all("other" not in layer.sparse_values for _, layer in sparse_layers(model))
