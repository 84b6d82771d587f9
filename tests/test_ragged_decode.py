"""RaggedLayer against a naive reference: appends write in place (a decode step copies its new rows only), views
handed out never change, shallow copies stay independent, and beam reordering, offloading and reset keep the rows.

The reference is the layout the layer promises, rebuilt from scratch: each (sequence, head)'s kept rows
right-aligned after zeros, then every row appended since, for every sequence alike.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvpress_like.errors import UnsupportedInputError
from kvpress_like.ragged import MIN_SPARE, RaggedLayer

DIM = 4
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class NaiveRagged:
    """The reference: kept parts per (sequence, head) and one tensor of appended rows, concatenated on every read.
    The kept rows' width is the longest part when built; selecting sequences keeps it (the cache's logical length
    is its physical length plus what it evicted, so the physical length must not change)."""

    def __init__(self, key_parts, value_parts):
        self.key_parts, self.value_parts = key_parts, value_parts
        self.width = max(p.shape[0] for row in key_parts for p in row)
        batch, heads = len(key_parts), len(key_parts[0])
        self.added_keys = torch.zeros(batch, heads, 0, DIM, dtype=torch.float64)
        self.added_values = torch.zeros(batch, heads, 0, DIM, dtype=torch.float64)

    def append(self, keys, values):
        self.added_keys = torch.cat([self.added_keys, keys], -2)
        self.added_values = torch.cat([self.added_values, values], -2)

    def take(self, index: list[int]):
        self.key_parts = [self.key_parts[i] for i in index]
        self.value_parts = [self.value_parts[i] for i in index]
        self.added_keys, self.added_values = self.added_keys[index], self.added_values[index]

    def padded(self):
        width = self.width
        out = []
        for parts, added in ((self.key_parts, self.added_keys), (self.value_parts, self.added_values)):
            rows = torch.zeros(len(parts), len(parts[0]), width + added.shape[-2], DIM, dtype=torch.float64)
            for b, row in enumerate(parts):
                for h, part in enumerate(row):
                    rows[b, h, width - part.shape[0] : width] = part
            rows[:, :, width:] = added
            out.append(rows)
        return out

    def valid(self):
        width = self.width
        total = width + self.added_keys.shape[-2]
        return torch.tensor([[[width - p.shape[0] <= t for t in range(total)] for p in row] for row in self.key_parts])

    def nbytes(self):
        kept = sum(p.numel() for parts in (self.key_parts, self.value_parts) for row in parts for p in row)
        return 8 * (kept + self.added_keys.numel() + self.added_values.numel())


def random_parts(lengths: list[list[int]], seed: int):
    generator = torch.Generator().manual_seed(seed)
    make = lambda n: torch.randn(n, DIM, generator=generator, dtype=torch.float64) + 1  # noqa: E731 (never zero)
    return [[make(n) for n in row] for row in lengths], [[make(n) for n in row] for row in lengths]


def random_rows(batch: int, heads: int, rows: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, rows, DIM, generator=generator, dtype=torch.float64) for _ in range(2))


def assert_same(layer: RaggedLayer, naive: NaiveRagged) -> None:
    keys, values = layer.padded()
    want_keys, want_values = naive.padded()
    assert torch.equal(keys, want_keys) and torch.equal(values, want_values)
    assert torch.equal(layer.valid_rows(), naive.valid())
    assert layer.get_seq_length() == want_keys.shape[-2]
    assert layer.nbytes() == naive.nbytes()
    assert layer.allocated_nbytes() >= layer.nbytes()
    for got, want in ((layer.key_parts, naive.key_parts), (layer.value_parts, naive.value_parts)):
        assert all(torch.equal(g, w) for grow, wrow in zip(got, want, strict=True)
                   for g, w in zip(grow, wrow, strict=True))


lengths_strategy = st.integers(1, 3).flatmap(
    lambda heads: st.lists(st.lists(st.integers(1, 12), min_size=heads, max_size=heads), min_size=1, max_size=3)
)
# an operation: ("append", rows) | ("copy", which) — continue on a shallow copy or on the original | ("beams", seed)
operation = st.one_of(
    st.tuples(st.just("append"), st.integers(1, 5)),
    st.tuples(st.just("copy"), st.booleans()),
    st.tuples(st.just("beams"), st.integers(0, 1000)),
    st.tuples(st.just("offload"), st.just(0)),
)


@SETTINGS
@given(lengths=lengths_strategy, operations=st.lists(operation, max_size=12), seed=st.integers(0, 100))
def test_appends_copies_and_beams_keep_the_layout_of_the_naive_reference(lengths, operations, seed):
    keys, values = random_parts(lengths, seed)
    layer, naive = RaggedLayer(keys, values), NaiveRagged(keys, values)
    handed_out = []  # (view returned by update, its contents then): never written afterwards
    others = []  # (layer, reference) pairs left behind by shallow copies: they must not see later appends
    for step, (kind, arg) in enumerate(operations):
        if kind == "append":
            new_keys, new_values = random_rows(len(lengths), len(lengths[0]), arg, seed + step)
            got_keys, _ = layer.update(new_keys, new_values)
            naive.append(new_keys, new_values)
            handed_out.append((got_keys, got_keys.clone()))
        elif kind == "copy":
            twin, twin_naive = copy.copy(layer), copy.copy(naive)
            others.append((layer, naive) if arg else (twin, twin_naive))
            if arg:
                layer, naive = twin, twin_naive
        elif kind == "beams":
            index = torch.randint(0, len(lengths), (len(lengths),), generator=torch.Generator().manual_seed(arg))
            layer.reorder_cache(index)
            naive.take(index.tolist())
        else:
            layer.offload()
            layer.prefetch()
        assert_same(layer, naive)
    for view, contents in handed_out:
        assert torch.equal(view, contents)
    for other, other_naive in others:
        assert_same(other, other_naive)


def test_a_decode_step_writes_in_place_and_reallocates_a_logarithmic_number_of_times():
    """The old layer built a new padded tensor every step; this one writes where the last step left off."""
    keys, values = random_parts([[40, 7, 25]], seed=0)
    layer = RaggedLayer(keys, values)
    addresses = []
    for step in range(400):
        new_keys, new_values = random_rows(1, 3, 1, seed=step)
        got, _ = layer.update(new_keys, new_values)
        addresses.append(got.data_ptr())
    reallocations = sum(a != b for a, b in itertools.pairwise(addresses))
    assert 1 <= reallocations <= 12  # 40 + 400 rows, a quarter more each time: 9 growths
    assert addresses[0] == addresses[MIN_SPARE - 1], "the first buffer's spare columns were not written in place"


def test_bytes_count_the_entries_and_the_allocation_adds_padding_and_spare_columns():
    keys, values = random_parts([[10, 4], [6, 2]], seed=1)
    layer = RaggedLayer(keys, values)
    entry = 2 * DIM * 8  # key + value row, float64
    assert layer.nbytes() == layer.allocated_nbytes() == 22 * entry  # unpadded until the first append
    layer.update(*random_rows(2, 2, 3, seed=2))
    assert layer.nbytes() == (22 + 4 * 3) * entry
    capacity = 13 + max(13 // 4, MIN_SPARE)  # 10 kept columns + 3 added, then the spare ones
    assert layer.allocated_nbytes() == 4 * capacity * entry


def test_a_shallow_copy_that_appends_leaves_the_original_and_its_views_alone():
    keys, values = random_parts([[5, 9]], seed=3)
    original = RaggedLayer(keys, values)
    original.update(*random_rows(1, 2, 2, seed=4))
    before, _ = original.padded()
    before = before.clone()
    twin = copy.copy(original)
    twin.update(*random_rows(1, 2, 3, seed=5))  # in place: the buffer's spare columns past the original's rows
    mine = random_rows(1, 2, 1, seed=6)
    original.update(*mine)  # must not overwrite the twin's rows, nor the twin its own
    assert torch.equal(original.padded()[0][:, :, :11], before)
    assert torch.equal(original.padded()[0][:, :, 11:], mine[0])
    assert twin.get_seq_length() == 14 and not torch.equal(twin.padded()[0][:, :, 11:12], mine[0])


def test_repeating_and_selecting_sequences_follow_the_reference():
    keys, values = random_parts([[3, 8], [6, 1]], seed=7)
    layer, naive = RaggedLayer(keys, values), NaiveRagged(keys, values)
    layer.batch_repeat_interleave(2)
    naive.take([0, 0, 1, 1])
    assert_same(layer, naive)
    rows = random_rows(4, 2, 2, seed=8)
    layer.update(*rows)
    naive.append(*rows)
    layer.batch_select_indices(torch.tensor([3, 0]))
    naive.take([3, 0])
    assert_same(layer, naive)


def test_reset_leaves_an_empty_layer_that_grows_like_a_dense_one():
    keys, values = random_parts([[3, 8]], seed=9)
    layer = RaggedLayer(keys, values)
    layer.update(*random_rows(1, 2, 2, seed=10))
    layer.reset()
    assert layer.get_seq_length() == 0 and layer.nbytes() == 0 and layer.lengths.tolist() == [[0, 0]]
    rows = random_rows(1, 2, 3, seed=11)
    got_keys, got_values = layer.update(*rows)
    assert torch.equal(got_keys, rows[0]) and torch.equal(got_values, rows[1])
    assert bool(layer.valid_rows().all())


def test_only_a_crop_that_removes_nothing_is_accepted():
    layer = RaggedLayer(*random_parts([[3, 8]], seed=12))
    layer.crop(0)
    assert layer.get_seq_length() == 8
    with pytest.raises(UnsupportedInputError, match="only crop\\(0\\) is valid"):
        layer.crop(-1)
