"""The end-to-end benchmark runs on the CPU with tiny dimensions and prints every table it promises."""

from __future__ import annotations

import re

import pytest
import torch

from ksdk.bench.e2e import E2EConfig, run_e2e


def test_small_run_prints_decode_prefill_and_61_layer_figures(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KSDK_CACHE", str(tmp_path))  # its synthetic file, written once here
    run_e2e(E2EConfig(layers=3, dense_layers=1, batches=(1, 2), prefill=(24,), context=16, decode_steps=1,
                      device="cpu", dtype=torch.float32, small=True))
    text = capsys.readouterr().out
    assert re.search(r"^\s+1\s+[\d.]+", text, re.M) and re.search(r"^\s+2\s+[\d.]+", text, re.M)  # decode rows
    prefill = re.search(r"prefill\s+24 tokens:\s+([\d.]+) tok/s", text)
    assert prefill and float(prefill.group(1)) > 0
    extrapolated = re.search(r"dense layer ([\d.]+) ms, MoE layer ([\d.]+) ms.*-> 61 layers: (\d+) tok/s", text)
    assert extrapolated and all(float(v) > 0 for v in extrapolated.groups())


def test_step_graph_extrapolation_adds_the_missing_layers_at_their_measured_cost() -> None:
    from ksdk.bench.e2e import StepTimes

    # 1 dense + 2 MoE layers: experts 2 ms per MoE layer, a MoE layer's gap 0.3 ms, the lead 1.0 ms (the dense
    # layer 0.7 + the first attention 0.3).
    t = StepTimes(step_ms=6.0, experts_ms=4.0, gpu_side_ms=0.0, rest_ms=0.5, gap_ms=0.3, lead_ms=1.0)
    assert t.r1_ms(moe_layers=2, dense_layers=1, full_moe=58, full_dense=3) == pytest.approx(
        6.0 + 56 * (2.0 + 0.3) + 2 * 0.7)
    assert t.r1_ms(moe_layers=2, dense_layers=1, full_moe=2, full_dense=1) == pytest.approx(6.0)
