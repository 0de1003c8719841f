"""idset.py: an exact set of ids in one sorted Arrow array, asked a block of ids at a time."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from pipeline.idset import IdSet

ids = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=12)


@given(committed=st.lists(ids, max_size=60), asked=st.lists(ids, max_size=60), near=st.booleans())
def test_contains_each_answers_exactly_as_a_python_set_would(committed, asked, near):
    """Both ways of looking up (hashing a narrow stretch, searching the whole) agree with a set."""
    if near:
        asked = asked + committed[: len(asked)]  # ids inside the committed stretch, some committed
    found = IdSet(committed)

    answer = found.contains_each(pa.array(asked, pa.string())).to_pylist()

    assert answer == [row_id in set(committed) for row_id in asked]
    assert [row_id in found for row_id in asked] == answer


def test_a_block_of_a_million_searches_only_its_stretch_and_misses_nothing():
    found = IdSet(f"img-{n:07d}" for n in range(0, 200_000, 2))
    asked = pa.array([f"img-{n:07d}" for n in range(1000, 1100)] + [None, "zzz", ""], pa.string())

    answer = found.contains_each(asked).to_pylist()

    assert answer == [n % 2 == 0 for n in range(1000, 1100)] + [False, False, False]


def test_repeated_ids_are_held_once_and_counted_as_repeats():
    found = IdSet(["b", "a", "b"])
    found.add_column(pa.chunked_array([pa.array(["a", "c", None])]))

    assert len(found) == 3 and found.repeats == 2
    found.difference_update(["a", "x"])
    assert len(found) == 2 and "a" not in found and "b" in found and "c" in found
