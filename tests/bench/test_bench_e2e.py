"""The end-to-end benchmark runs on the CPU with tiny dimensions and prints every table it promises."""

from __future__ import annotations

import re

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
