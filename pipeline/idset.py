"""An exact set of row ids held as one sorted Arrow array: what a resumed run must not send again.

A million committed ids as Python strings in a set take ~100 MB and a Python object each; here they are
one binary array (~14 bytes an id) searched with ``pyarrow.compute.search_sorted``. Membership is asked
a block of ids at a time (``contains_each``), so the manifest reader can skip committed rows without
building a Python object per row. Exact: ids are compared byte for byte, never by a hash that could
mistake an unsent row for a committed one.
"""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

HASH_WINDOW_FACTOR = 4  # up to this many stretch ids per asked id, a hash lookup; beyond, a binary search


class IdSet:
    """Ids as UTF-8 bytes in ascending order, each once. Columns are added unsorted and sorted once,
    when the set is first asked something."""

    def __init__(self, row_ids: Iterable[str] = ()) -> None:
        self._sorted: pa.Array = pa.array([], pa.binary())
        self._added: list[pa.Array] = []
        self._repeats = 0
        ids = list(row_ids)
        if ids:
            self.add_column(pa.array(ids, pa.string()))

    def add_column(self, ids: pa.Array | pa.ChunkedArray) -> None:
        """Add a column of ids (string or binary; nulls are ignored)."""
        chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
        self._added.extend(pc.cast(chunk, pa.binary()) for chunk in chunks)

    def contains_each(self, row_ids: pa.Array | pa.ChunkedArray) -> pa.BooleanArray:
        """Whether each of `row_ids` (string or binary) is in the set; null ids are not."""
        values = self._values()
        needles = pc.cast(row_ids, pa.binary())
        if isinstance(needles, pa.ChunkedArray):
            needles = needles.combine_chunks()
        if not len(values) or not len(needles):
            return pa.array([False] * len(needles), pa.bool_())
        bounds = pc.min_max(needles)
        if not bounds["min"].is_valid:  # only null ids
            return pa.array([False] * len(needles), pa.bool_())
        # Search only the stretch between the block's least and greatest id: a block of a manifest in
        # the order its rows were committed meets a few thousand neighbouring ids, not all of them.
        low = pc.search_sorted(values, bounds["min"]).as_py()
        high = pc.search_sorted(values, bounds["max"], side="right").as_py()
        window = values.slice(low, high - low)
        if not len(window):
            return pa.array([False] * len(needles), pa.bool_())
        if len(window) <= HASH_WINDOW_FACTOR * len(needles):  # hashing a narrow stretch beats searching
            return pc.fill_null(pc.is_in(needles, value_set=window), False)
        # Searched in order, neighbouring needles walk the same path down the sorted ids and stay in
        # the cache: sorting them first costs less than it saves when they are scattered.
        order = pc.sort_indices(needles)
        ordered = needles.take(order)
        at = pc.search_sorted(window, ordered)
        is_inside = pc.less(at, len(window))
        found = window.take(pc.if_else(is_inside, at, 0))
        is_found = pc.fill_null(pc.and_(is_inside, pc.equal(found, ordered)), False)
        return is_found.take(pc.sort_indices(order))  # back to the needles' own order

    def __contains__(self, row_id: object) -> bool:
        if not isinstance(row_id, str) or not len(self._values()):
            return False
        return bool(self.contains_each(pa.array([row_id], pa.string()))[0].as_py())

    def __len__(self) -> int:
        return len(self._values())

    @property
    def repeats(self) -> int:
        """Ids added more than once, counted once per extra copy (rows a retry superseded)."""
        self._values()
        return self._repeats

    def difference_update(self, row_ids: Iterable[str]) -> None:
        """Remove `row_ids` from the set, in place (a copy of a million ids would cost tens of MB)."""
        values = self._values()
        removed = pa.array(list(row_ids), pa.string()).cast(pa.binary())
        if len(values) and len(removed):
            self._sorted = values.filter(pc.invert(pc.is_in(values, value_set=removed)))

    def _values(self) -> pa.Array:
        """The sorted, distinct ids, merging columns added since the last question."""
        if self._added:
            values = pa.concat_arrays([self._sorted, *self._added]).drop_null()
            self._added = []
            if len(values) > 1 and not _is_ascending(values):
                values = values.take(pc.array_sort_indices(values))
            if len(values) > 1:  # sorted: a repeated id sits next to itself
                is_new = pc.not_equal(values.slice(1), values.slice(0, len(values) - 1))
                if not pc.all(is_new).as_py():
                    values = values.filter(pa.concat_arrays([pa.array([True]), is_new]))
                    self._repeats += len(is_new) + 1 - len(values)
            self._sorted = values
        return self._sorted


def _is_ascending(values: pa.Array) -> bool:
    """Whether `values` is already in order (parts of ids written in order need no sort)."""
    return bool(pc.all(pc.less_equal(values.slice(0, len(values) - 1), values.slice(1))).as_py())
