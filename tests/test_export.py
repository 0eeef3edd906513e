"""The merged export: the file holds exactly the merged weights in the chosen 16-bit type, a reload
computes what the in-memory model does, and the drift from rounding is reported."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from dpoflow.base.config import ExportSpec
from dpoflow.engine.models import load_model
from dpoflow.base.records import ModelRef, TrainedAdapter
from dpoflow.tasks.export import export_model


@pytest.fixture
def adapter(tiny_model, tmp_path):
    model = get_peft_model(load_model(str(tiny_model), "float32"), LoraConfig(r=4, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)  # a trained-looking adapter, so merging changes the weights
    model.save_pretrained(tmp_path / "adapter")
    start = ModelRef(path=str(tiny_model), digest="x", source="builtin:tiny-llama", role="base")
    return TrainedAdapter(path=str(tmp_path / "adapter"), digest="x", start=start, reference="", metrics={})


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_merged_weights_reload_exactly_and_drift_is_reported(adapter, tmp_path, dtype):
    out = export_model(adapter, ExportSpec(formats=["adapter", "merged"], dtype=dtype), tmp_path / "out")
    c = out.checks
    assert c["merged_weight_max_diff"] == 0.0 and c["merged_max_logit_diff_reloaded"] <= 1e-4
    assert json.loads((tmp_path / "out" / "merged" / "config.json").read_text())["dtype"] == dtype
    if dtype == "float32":
        assert c["merged_max_logit_diff_vs_fp32"] <= 1e-4
    else:
        assert 0 < c["merged_max_logit_diff_vs_fp32"] < 0.1 and c["merged_top1_agreement_vs_fp32"] >= 0.9
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
