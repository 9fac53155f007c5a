"""The conversion record: a frozen, typed record that also reads as a mapping."""

import dataclasses
import math

import pytest
import torch

import moefy
from moefy.layers.record import ConversionRecord


def test_a_layer_built_directly_holds_an_empty_record():
    moe = moefy.MoE(8, 16, num_experts=4, top_k=2)
    assert moe.conversion == ConversionRecord() and dict(moe.conversion) == {}
    assert moe.conversion.get("method", "—") == "—"


def test_fields_and_measured_values_read_by_name_and_as_a_mapping():
    r = ConversionRecord(name="mlp", method="split", dense_ffn_size=64,
                         measured={"router_recall": 0.9})
    assert r.method == "split" and r["method"] == "split" and r["router_recall"] == 0.9
    assert list(r) == ["name", "method", "dense_ffn_size", "router_recall"]
    assert "verified" not in r and r.get("verified") is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.method = "upcycle"
    later = r.with_(verified="exact", calibration_tokens=12)
    assert later.verified == "exact" and later.measured["calibration_tokens"] == 12
    assert r.verified is None and "calibration_tokens" not in r  # the first one unchanged
    with pytest.raises(ValueError, match="named like fields"):
        ConversionRecord(measured={"method": "x"})


def test_json_round_trip():
    r = ConversionRecord(name="mlp", method="peer", distill={"steps": 3, "loss_last": math.nan},
                         measured={"grid": (8, 8), "bias": torch.tensor([1.0, 2.0]),
                                   "opaque": object()})
    data = r.to_json()
    assert data == {"name": "mlp", "method": "peer", "distill": {"steps": 3, "loss_last": None},
                    "grid": [8, 8], "bias": [1.0, 2.0]}
    back = ConversionRecord.of(data)
    assert back.name == "mlp" and back.distill == {"steps": 3, "loss_last": None}
    assert back.measured == {"grid": [8, 8], "bias": [1.0, 2.0]}
    with pytest.raises(TypeError, match="must be a mapping"):
        ConversionRecord.of("split")


def test_convert_writes_one_record_per_layer():
    dense = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    moe_model = moefy.convert(dense, moefy.MoEConfig(num_experts=4, top_k=4),
                              example_inputs=(torch.randn(4, 8),))
    record = moe_model[0].conversion
    assert isinstance(record, ConversionRecord)
    assert (record.name, record.method, record.dense_ffn_size) == ("0", "split", 32)
    assert record.verified.startswith("exact")
