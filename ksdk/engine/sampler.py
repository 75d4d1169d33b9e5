"""Token sampling, vectorized over the batch; per-sequence generators keep seeded runs reproducible
whatever else is in the batch."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq

import torch

from ksdk.engine.request import Sequence
from ksdk.sampling import MAX_TOP_LOGPROBS

__all__ = ["SampledTokens", "Sampler"]


@dataclasses.dataclass(frozen=True)
class SampledTokens:
    """One new token per sequence; logprob rows only for sequences that asked."""

    token_ids: list[int]
    logprobs: list[float | None]
    top_ids: list[list[int]]  # [S][top_logprobs]
    top_logprobs: list[list[float]]


class Sampler:
    """Penalties → temperature → top-k / top-p / min-p → an exponential race per row."""

    def __call__(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> SampledTokens:
        # logits: [S, V] float32, row i belongs to seqs[i]
        params = [s.request.params for s in seqs]
        want_lp = [p.logprobs or p.top_logprobs > 0 for p in params]
        raw_logprobs = torch.log_softmax(logits.float(), dim=-1) if any(want_lp) else None  # the model's own
        logits = self._forbid_early_stops(logits, seqs)
        if any(p.uses_penalties for p in params):
            logits = self._apply_penalties(logits.float().clone(), seqs)
        if all(p.greedy for p in params):  # fast path: no sort, no random draws
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits.float(), seqs)
        return self._collect(tokens, raw_logprobs, seqs, want_lp)

    @staticmethod
    def _forbid_early_stops(logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        """min_tokens: a sequence shorter than that cannot draw EOS or one of its stop token ids."""
        early = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.request.params.min_tokens]
        if not early:
            return logits
        logits = logits.clone()
        for i in early:
            req = seqs[i].request
            ids = [*req.params.stop_token_ids, *(() if req.params.ignore_eos else req.eos_token_ids)]
            logits[i, torch.tensor(ids, dtype=torch.int64, device=logits.device)] = float("-inf")
        return logits

    def _apply_penalties(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        device, (rows, vocab) = logits.device, logits.shape
        params = [s.request.params for s in seqs]
        counts = torch.zeros((rows, vocab), dtype=torch.float32)  # [S, V] output token counts
        seen = torch.zeros((rows, vocab), dtype=torch.bool)  # [S, V] in prompt or output
        for i, s in enumerate(seqs):
            out = torch.tensor(s.output_ids, dtype=torch.int64)
            counts[i].index_add_(0, out, torch.ones(len(out)))
            seen[i, torch.tensor(s.token_ids, dtype=torch.int64)] = True
        counts, seen = counts.to(device), seen.to(device)

        def col(name: str) -> torch.Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=device)[:, None]

        rep = col("repetition_penalty")
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return logits - col("frequency_penalty") * counts - col("presence_penalty") * (counts > 0)

    def _sample(self, logits: torch.Tensor, seqs: Seq[Sequence]) -> torch.Tensor:
        device, vocab = logits.device, logits.shape[1]
        params = [s.request.params for s in seqs]

        def col(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)[:, None]

        greedy = torch.tensor([p.greedy for p in params], device=device)
        argmax = logits.argmax(dim=-1)
        temps = col([p.temperature if not p.greedy else 1.0 for p in params])
        logits = logits / temps
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [S, V]
        ranks = torch.arange(vocab, device=device)[None, :]
        top_k = col([float(p.top_k) if p.top_k > 0 else float(vocab) for p in params])
        drop = ranks >= top_k
        sorted_probs = sorted_logits.softmax(dim=-1)
        # top-p keeps the smallest head whose mass reaches p (the first token always stays)
        drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= col([p.top_p for p in params])
        drop |= sorted_probs < col([p.min_p for p in params]) * sorted_probs[:, :1]
        drop[:, 0] = False
        drop = drop.scatter(1, order, drop)  # back to vocabulary order
        probs = logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        race = torch.empty_like(probs)  # [S, V] Exp(1) draws, each row from its sequence's generator
        for i, s in enumerate(seqs):
            race[i].exponential_(generator=s.generator)
        sampled = (probs / race).argmax(dim=-1)
        return torch.where(greedy, argmax, sampled)

    def _collect(self, tokens: torch.Tensor, raw_logprobs: torch.Tensor | None, seqs: Seq[Sequence],
                 want_lp: list[bool]) -> SampledTokens:
        token_list = tokens.tolist()
        n = len(token_list)
        if raw_logprobs is None:
            return SampledTokens(token_list, [None] * n, [[] for _ in range(n)], [[] for _ in range(n)])
        chosen = raw_logprobs.gather(1, tokens[:, None].to(raw_logprobs.device))[:, 0].tolist()
        k = max(s.request.params.top_logprobs for s in seqs)
        top_lp, top_ids = raw_logprobs.topk(min(max(k, 1), MAX_TOP_LOGPROBS), dim=-1)
        top_ids_l, top_lp_l = top_ids.tolist(), top_lp.tolist()
        ks = [s.request.params.top_logprobs for s in seqs]
        return SampledTokens(
            token_list,
            [c if w else None for c, w in zip(chosen, want_lp)],
            [ids[:kk] if w else [] for ids, kk, w in zip(top_ids_l, ks, want_lp)],
            [lps[:kk] if w else [] for lps, kk, w in zip(top_lp_l, ks, want_lp)],
        )
