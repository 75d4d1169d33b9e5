"""The experts benchmark runs end to end (on a tiny layer) and reports sane numbers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from ksdk.bench.__main__ import main
from ksdk.bench.experts import SMALL, run_experts_bench

TINY = replace(SMALL, name="tiny layer", n_expert=16, hidden=256, intermediate=256, tokens=(1, 3),
               seconds_per_point=0.0, min_calls=2, probe_bytes=16 << 20)


def test_bench_reports_every_token_count(capsys) -> None:
    results = run_experts_bench(TINY, num_threads=1, isa="auto", why="test")
    assert [r.num_tokens for r in results] == [1, 3]
    assert all(r.ms_per_layer > 0 and r.gbs > 0 for r in results)
    assert results[0].experts_per_call == 8.0  # top-8 of distinct experts for one token
    text = capsys.readouterr().out
    assert "GB/s" in text and "% of host" in text and "host read bandwidth" in text


def test_bench_reads_a_private_copy_when_asked(capsys) -> None:
    results = run_experts_bench(TINY, num_threads=1, isa="auto", why="test", copy_to_ram=True)
    assert all(r.ms_per_layer > 0 and r.gbs > 0 for r in results)
    assert "a private copy, huge pages requested" in capsys.readouterr().out


def test_cli_rejects_bad_token_list(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["experts", "--tokens", "1,zero"])
    assert "--tokens" in capsys.readouterr().err
