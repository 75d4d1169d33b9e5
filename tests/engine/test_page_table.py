from __future__ import annotations

from ksdk.engine.page_table import PageTable

from tests.engine.helpers import make_seq


def admit(pt: PageTable, tokens: list[int]):
    seq = make_seq(tokens)
    cached = pt.match_prefix(seq.token_ids)
    assert pt.can_admit(seq, cached)
    pt.admit(seq, cached)
    return seq


def compute_all(pt: PageTable, seq) -> None:
    seq.num_computed_tokens = len(seq.token_ids)
    pt.commit(seq)


def test_allocate_and_release_return_every_page() -> None:
    pt = PageTable(num_pages=8, page_size=4)
    a = admit(pt, list(range(10)))  # 3 pages
    b = admit(pt, list(range(100, 105)))  # 2 pages
    assert len(a.pages) == 3 and len(b.pages) == 2 and not set(a.pages) & set(b.pages)
    assert pt.num_free == 3
    pt.release(a)
    pt.release(b)
    assert pt.num_free == 8 and pt.num_used == 0


def test_prefix_hit_shares_full_pages_but_never_the_last_tokens_page() -> None:
    pt = PageTable(num_pages=8, page_size=4)
    first = admit(pt, list(range(12)))
    compute_all(pt, first)  # 3 full pages cached
    second = admit(pt, list(range(12)))
    assert second.pages[:2] == first.pages[:2]  # the page with the last prompt token is recomputed
    assert second.pages[2] != first.pages[2]
    assert second.num_computed_tokens == 8
    third = admit(pt, list(range(13)))  # one more token: all three full pages may be reused
    assert third.pages[:3] == first.pages and third.num_computed_tokens == 12


def test_chained_hash_needs_the_whole_prefix_to_match() -> None:
    pt = PageTable(num_pages=8, page_size=4)
    first = admit(pt, list(range(9)))
    compute_all(pt, first)
    other = admit(pt, [99, 1, 2, 3] + list(range(4, 9)))  # same second page, different first page
    assert other.num_computed_tokens == 0 and not set(other.pages) & set(first.pages)


def test_unreferenced_cached_pages_stay_until_evicted_least_recent_first() -> None:
    pt = PageTable(num_pages=4, page_size=2)
    a = admit(pt, [1, 2, 3, 4, 5])  # 3 pages, two full ones get cached
    compute_all(pt, a)
    pt.release(a)
    assert pt.num_free == 4
    assert admit(pt, [1, 2, 3, 4, 9]).num_computed_tokens == 4  # still cached after release
    pt2 = PageTable(num_pages=4, page_size=2)
    a = admit(pt2, [1, 2, 3, 4, 5])
    compute_all(pt2, a)
    pt2.release(a)
    filler = admit(pt2, [7, 7, 7, 7, 7, 7, 7])  # needs all 4 pages: evicts the cached ones
    assert len(filler.pages) == 4
    pt2.release(filler)
    assert admit(pt2, [1, 2, 3, 4, 9]).num_computed_tokens == 0


def test_shared_page_survives_one_owners_release() -> None:
    pt = PageTable(num_pages=6, page_size=2)
    a = admit(pt, [1, 2, 3])
    compute_all(pt, a)
    b = admit(pt, [1, 2, 5])
    shared = a.pages[0]
    assert b.pages[0] == shared
    pt.release(a)
    c = admit(pt, [8] * 7)  # takes every free page but the shared one
    assert shared not in c.pages
    assert pt.num_free == 0
    pt.release(b)
    pt.release(c)
    assert pt.num_free == 6


def test_disabled_prefix_caching_never_matches() -> None:
    pt = PageTable(num_pages=8, page_size=2, enable_prefix_caching=False)
    a = admit(pt, [1, 2, 3, 4, 5])
    compute_all(pt, a)
    assert admit(pt, [1, 2, 3, 4, 5]).num_computed_tokens == 0
