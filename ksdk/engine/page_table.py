"""Host bookkeeping of the KV page pool: free pages, reference counts and the prefix cache.

A FULL page is keyed by a chained hash of its token ids (parent page's hash + its own tokens), so a key
names the whole prefix up to that page. Cached pages are shared by reference count; when the count drops
to zero they stay cached but evictable, least recently released first.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ksdk.engine.request import Sequence

__all__ = ["PageTable", "page_hash"]


def page_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
    """Key of a full page: stable within a process (ints and tuples of ints hash deterministically)."""
    return hash((parent, tokens))


class PageTable:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: deque[int] = deque(range(num_pages))
        self._refs = [0] * num_pages
        self._key: list[tuple[int, tuple[int, ...]] | None] = [None] * num_pages  # (hash, tokens) if cached
        self._cached: dict[int, int] = {}  # hash -> page
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached pages nobody references, LRU first
        self.cache_queries = 0  # prompt pages looked up / found, for the hit rate
        self.cache_hits = 0

    @property
    def num_free(self) -> int:
        """Pages an allocation may take: never used, or cached but unreferenced."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_free

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached pages holding a leading part of ``token_ids``; never the page of the last token,
        whose logits must be computed."""
        if not self.enable_prefix_caching:
            return []
        ps, pages, parent = self.page_size, [], None
        for i in range((len(token_ids) - 1) // ps):
            tokens = tuple(token_ids[i * ps:(i + 1) * ps])
            parent = page_hash(parent, tokens)
            page = self._cached.get(parent)
            if page is None or self._key[page] != (parent, tokens):  # miss or hash collision
                break
            pages.append(page)
        return pages

    def can_admit(self, seq: Sequence, cached: list[int]) -> bool:
        """Enough free pages for all of ``seq``'s tokens besides the cached ones?"""
        held = sum(1 for p in cached if p in self._evictable)  # these stop being free once taken
        return self.pages_for(len(seq.token_ids)) - len(cached) <= self.num_free - held

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give ``seq`` the cached pages (shared) and fresh pages for the rest of its tokens."""
        assert not seq.pages and seq.num_computed_tokens == 0
        for page in cached:
            self._ref(page)
        self.cache_queries += (len(seq.token_ids) - 1) // self.page_size
        self.cache_hits += len(cached)
        seq.pages = list(cached) + self.allocate(self.pages_for(len(seq.token_ids)) - len(cached))
        seq.num_computed_tokens = len(cached) * self.page_size
        seq.num_hashed_pages = len(cached)
        seq.last_page_hash = self._key[cached[-1]][0] if cached else None  # type: ignore[index]

    def allocate(self, count: int) -> list[int]:
        assert count <= self.num_free, "caller checks num_free first"
        pages = []
        for _ in range(count):
            if self._free:
                page = self._free.popleft()
            else:  # evict the least recently released cached page
                page, _ = self._evictable.popitem(last=False)
                key = self._key[page]
                assert key is not None
                del self._cached[key[0]]
                self._key[page] = None
            self._refs[page] = 1
            pages.append(page)
        return pages

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make ``seq``'s pages cover ``num_tokens``; False (nothing taken) if too few are free."""
        need = self.pages_for(num_tokens) - len(seq.pages)
        if need > self.num_free:
            return False
        if need > 0:
            seq.pages += self.allocate(need)
        return True

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; its tail pages go first in eviction order."""
        for page in reversed(seq.pages):
            self._refs[page] -= 1
            assert self._refs[page] >= 0
            if self._refs[page] == 0:
                if self._key[page] is not None:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        seq.pages = []
        seq.num_computed_tokens = 0
        seq.num_hashed_pages = 0
        seq.last_page_hash = None

    def commit(self, seq: Sequence) -> None:
        """Register ``seq``'s newly completed full pages in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        ps = self.page_size
        while (seq.num_hashed_pages + 1) * ps <= seq.num_computed_tokens:
            i = seq.num_hashed_pages
            tokens = tuple(seq.token_ids[i * ps:(i + 1) * ps])
            key = page_hash(seq.last_page_hash, tokens)
            page = seq.pages[i]
            if key not in self._cached and self._key[page] is None:  # first writer of this prefix wins
                self._cached[key] = page
                self._key[page] = (key, tokens)
            seq.last_page_hash = key
            seq.num_hashed_pages += 1

    def _ref(self, page: int) -> None:
        if self._refs[page] == 0:
            del self._evictable[page]
        self._refs[page] += 1
