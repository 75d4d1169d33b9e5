"""Per-step batch metadata for paged MLA attention, built once on the host per step."""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["AttentionMetadata"]


@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    """Where each sequence's new tokens sit in the flat token batch and in the page pool.

    The batch holds B sequences and T new tokens, sequence i owning tokens
    ``query_start_loc[i]:query_start_loc[i+1]``. Its new tokens occupy context positions
    ``seq_lens[i] - query_len_i ... seq_lens[i] - 1``; the earlier ones are already in the cache.
    Every tensor lives on the model's device.
    """

    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    page_table: torch.Tensor  # [B, max_pages] int32, page ids of each sequence in order
    slot_mapping: torch.Tensor  # [T] int64, page_id * page_size + offset for each new token
    page_size: int
    query_lens_host: tuple[int, ...]  # the same facts on the host, for shape decisions
    seq_lens_host: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token."""
        return all(q == 1 for q in self.query_lens_host)

    @property
    def logits_indices(self) -> torch.Tensor:
        """[B] the index of each sequence's last new token in the flat batch."""
        return (self.query_start_loc[1:] - 1).long()

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        page_tables: list[list[int]],
        page_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Assemble from host lists (one entry per sequence)."""
        assert len(query_lens) == len(seq_lens) == len(page_tables)
        qsl = [0]
        slots: list[int] = []
        for q, s, pages in zip(query_lens, seq_lens, page_tables):
            assert 0 < q <= s and len(pages) * page_size >= s
            qsl.append(qsl[-1] + q)
            for pos in range(s - q, s):
                slots.append(pages[pos // page_size] * page_size + pos % page_size)
        width = max(1, max(len(p) for p in page_tables))
        table = torch.zeros((len(page_tables), width), dtype=torch.int32)
        for i, pages in enumerate(page_tables):
            table[i, : len(pages)] = torch.tensor(pages, dtype=torch.int32)
        pin = torch.device(device).type == "cuda"

        def to_dev(t: torch.Tensor) -> torch.Tensor:
            return t.pin_memory().to(device, non_blocking=True) if pin else t

        return cls(
            query_start_loc=to_dev(torch.tensor(qsl, dtype=torch.int32)),
            seq_lens=to_dev(torch.tensor(seq_lens, dtype=torch.int32)),
            page_table=to_dev(table),
            slot_mapping=to_dev(torch.tensor(slots, dtype=torch.int64)),
            page_size=page_size,
            query_lens_host=tuple(query_lens),
            seq_lens_host=tuple(seq_lens),
        )
