from __future__ import annotations

import math

import pytest
import torch

from ksdk.engine.sampler import Sampler

from tests.engine.helpers import make_seq

V = 50


def logits_rows(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((n, V), generator=torch.Generator().manual_seed(seed))


def test_greedy_is_argmax() -> None:
    logits = logits_rows(3)
    seqs = [make_seq([1], temperature=0.0) for _ in range(3)]
    assert Sampler()(logits, seqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_argmax_even_when_hot() -> None:
    logits = logits_rows(4)
    seqs = [make_seq([1], temperature=2.0, top_k=1), make_seq([1], temperature=2.0, top_p=1e-6, seed=1),
            make_seq([1], temperature=2.0, min_p=1.0, seed=2), make_seq([1], temperature=0.0)]
    assert Sampler()(logits, seqs).token_ids == logits.argmax(-1).tolist()


def test_top_k_limits_choices_to_the_k_best() -> None:
    logits = logits_rows(1).repeat(200, 1)
    seqs = [make_seq([1], temperature=2.0, top_k=3, seed=i) for i in range(200)]
    chosen = set(Sampler()(logits, seqs).token_ids)
    assert chosen <= set(logits[0].topk(3).indices.tolist()) and len(chosen) > 1


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch() -> None:
    row = logits_rows(1, seed=5)
    alone = [Sampler()(row, [make_seq([1], temperature=1.0, seed=42)]).token_ids[0] for _ in range(1)]
    for _ in range(3):  # the same seeded sequence, now among strangers in different positions
        batch = torch.cat([logits_rows(2, seed=9), row, logits_rows(3, seed=11)])
        seqs = [make_seq([1], temperature=0.7)] * 2 + [make_seq([1], temperature=1.0, seed=42)] + \
            [make_seq([1], temperature=1.3, top_p=0.9)] * 3
        assert Sampler()(batch, seqs).token_ids[2] == alone[0]


def test_sampling_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, math.log(3.0)] + [-1e9] * (V - 2)])
    seq = make_seq([1], temperature=1.0, seed=0)
    draws = [Sampler()(logits, [seq]).token_ids[0] for _ in range(2000)]
    share = draws.count(1) / len(draws)
    assert 0.70 < share < 0.80  # p = 0.75


def test_penalties_push_away_from_seen_tokens() -> None:
    logits = torch.zeros((3, V))
    logits[:, 5] = 1.0
    logits[:, 6] = 0.9
    seqs = [make_seq([5], temperature=0.0, repetition_penalty=2.0),  # 5 is in the prompt: 1.0 -> 0.5
            make_seq([1], temperature=0.0, frequency_penalty=0.2),
            make_seq([1], temperature=0.0, presence_penalty=0.2)]
    for s in seqs[1:]:
        s.token_ids.append(5)  # 5 was generated once
    assert Sampler()(logits, seqs).token_ids == [6, 6, 6]


def test_logprobs_are_the_models_and_top_list_is_sorted() -> None:
    logits = logits_rows(2)
    seqs = [make_seq([1], temperature=0.0, logprobs=True, top_logprobs=20), make_seq([1], temperature=0.0)]
    out = Sampler()(logits, seqs)
    ref = torch.log_softmax(logits, -1)
    assert out.logprobs[0] == pytest.approx(ref[0].max().item(), abs=1e-6)
    assert out.logprobs[1] is None and out.top_ids[1] == []
    assert len(out.top_ids[0]) == 20 and out.top_ids[0][0] == out.token_ids[0]
    assert out.top_logprobs[0] == sorted(out.top_logprobs[0], reverse=True)


def test_min_tokens_forbids_stop_token_ids_until_reached() -> None:
    logits = torch.zeros((2, V))
    logits[:, 7] = 10.0  # token 7 is by far the best, and a stop token
    early = make_seq([1], temperature=0.0, stop_token_ids=(7,), min_tokens=2)
    done = make_seq([1], temperature=0.0, stop_token_ids=(7,), min_tokens=2)
    done.token_ids.extend([3, 4])  # two tokens generated already
    assert Sampler()(logits, [early, done]).token_ids[0] != 7
    assert Sampler()(logits, [early, done]).token_ids[1] == 7


def test_min_tokens_above_max_tokens_is_refused() -> None:
    from ksdk import SamplingParamError, SamplingParams

    with pytest.raises(SamplingParamError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
