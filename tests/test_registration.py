"""PeftType.SPARSE is added to upstream peft safely, idempotently, and resolves through peft's public API."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest
from peft import PeftConfig, PeftType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from tiny_models import tiny_llama

from peft_sparse import SparseConfig, SparseModel, tuner
from peft_sparse.tuner import registration


def test_enum_member_behaves_like_a_builtin_one():
    assert PeftType.SPARSE.value == "SPARSE"
    assert PeftType("SPARSE") is PeftType.SPARSE
    assert PeftType["SPARSE"] is PeftType.SPARSE
    assert PeftType.SPARSE == "SPARSE"
    assert list(PeftType).count(PeftType.SPARSE) == 1
    assert PeftType.SPARSE in list(PeftType)
    assert isinstance(PeftType.SPARSE, PeftType)


def test_registered_with_peft_mappings():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSE] is SparseConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPARSE] is SparseModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.SPARSE] == "sparse_"


def test_register_and_reload_are_idempotent():
    tuner.register()
    tuner.register()
    importlib.reload(registration)
    tuner.register()
    assert list(PeftType).count(PeftType.SPARSE) == 1
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SPARSE] is SparseConfig
    model = get_peft_model(tiny_llama(), SparseConfig(target_modules=["q_proj"]))
    assert model.peft_config["default"].peft_type == PeftType.SPARSE


def test_adding_a_clashing_enum_value_is_refused():
    with pytest.raises(RuntimeError, match="already has a member with value 'LORA'"):
        registration._add_enum_member(PeftType, "NOT_LORA", "LORA")
    with pytest.raises(RuntimeError, match="already exists with value"):
        registration._add_enum_member(PeftType, "LORA", "SOMETHING_ELSE")


IMPORT_ORDERS = [
    "import peft.mapping\nimport peft_sparse",
    "import peft_sparse\nimport peft_sparse\nimport peft.mapping",
    "from peft import get_peft_model, PeftModel, PeftConfig\nimport peft_sparse",
]


@pytest.mark.slow
def test_import_orders_in_fresh_interpreters():
    check = textwrap.dedent(
        """
        from peft import PeftType
        from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
        assert list(PeftType).count(PeftType.SPARSE) == 1
        assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.SPARSE].__name__ == "SparseModel"
        print("ok")
        """
    )
    # one interpreter per order, all at once (each spends its seconds importing torch and peft)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", prelude + "\n" + check], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for prelude in IMPORT_ORDERS
    ]
    for prelude, process in zip(IMPORT_ORDERS, processes, strict=True):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{prelude!r}:\n{stderr}"
        assert stdout.strip() == "ok", prelude


def test_peft_config_from_pretrained_resolves_sparse_config(tmp_path):
    config = SparseConfig(target_modules=["q_proj", "v_proj"], density=0.02, budget="local", selection="fisher")
    config.save_pretrained(tmp_path)
    loaded = PeftConfig.from_pretrained(tmp_path)
    assert type(loaded) is SparseConfig
    assert loaded.peft_type == PeftType.SPARSE
    assert loaded.target_modules == {"q_proj", "v_proj"}
    assert (loaded.density, loaded.budget, loaded.selection) == (0.02, "local", "fisher")
