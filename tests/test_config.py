"""SparseConfig defaults and validation: every invalid field raises, naming the field and the value."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from peft_sparse import SparseConfig
from peft_sparse.tuner.config import SELECTION_METHODS


def test_defaults():
    config = SparseConfig()
    assert config.density == 0.01
    assert config.num_tunable_weights is None
    assert config.budget == "global"
    assert config.selection == "gradient"
    assert config.update == "static"
    assert config.salience_batches == 64
    assert config.regrow == "gradient"
    assert config.reselection_schedule == "cosine"
    assert config.reselection_rate == 0.2
    assert config.accumulation_steps == 5
    assert config.delta_dtype is None and config.torch_delta_dtype is None  # peft's autocast_adapter_dtype rule
    assert config.init_weights is True


def test_every_field_is_documented():
    for f in dataclasses.fields(SparseConfig):
        assert f.metadata.get("help"), f"SparseConfig.{f.name} has no help text"
    own = {f.name for f in dataclasses.fields(SparseConfig)} - {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode",
    }
    for name in own:
        assert f"{name} (`" in SparseConfig.__doc__, f"SparseConfig docstring does not document {name}"


@pytest.mark.parametrize("selection", SELECTION_METHODS)
def test_all_selection_methods_accepted(selection):
    assert SparseConfig(selection=selection).selection == selection


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
