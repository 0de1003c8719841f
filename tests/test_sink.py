import asyncio

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from pipeline.config import OutputConfig
from pipeline.records import CategoryFilter, FilterResult, ImageTask, Usage, VisionResult
from pipeline.sink import (
    SCHEMA,
    ParquetFileWriter,
    Sink,
    part_files,
    read_output,
    rows_to_table,
    schema_with_extras,
    write_new_part,
)


def result(row_id: str, **extra: str) -> VisionResult:
    task = ImageTask(row_id, (f"{row_id}.jpg",), "Describe.", "high", 1, extra)
    return VisionResult(
        task=task,
        status="ok",
        model="gpt-4",
        description=f"about {row_id}",
        finish_reason="stop",
        usage=Usage(800, 40, 840),
        prompt_filter=FilterResult(hate=CategoryFilter(False, "safe")),
        attempts=1,
        started_at=1_700_000_000.5,
    )


async def test_rows_are_committed_in_parts_of_rows_per_part(tmp_path):
    sink = Sink(tmp_path, OutputConfig(rows_per_part=2), "run1")

    for n in range(5):
        await sink.put(result(f"r{n}"))
    await sink.flush()

    assert [pq.read_metadata(p).num_rows for p in part_files(tmp_path)] == [2, 2, 1]
    table = ds.dataset(tmp_path).to_table()
    assert sorted(table.column("id").to_pylist()) == ["r0", "r1", "r2", "r3", "r4"]


async def test_the_output_has_the_schema_and_typed_filter_columns(tmp_path):
    sink = Sink(tmp_path, OutputConfig(), "run1", extra_columns=["license"])

    await sink.put(result("a", license="cc-by"))
    await sink.flush()

    table = read_output(tmp_path)
    assert table.schema.field("prompt_filter").type == SCHEMA.field("prompt_filter").type
    row = table.to_pylist()[0]
    assert row["prompt_filter"]["hate"] == {"filtered": False, "severity": "safe"}
    assert row["prompt_filter"]["violence"] is None
    assert row["license"] == "cc-by"
    assert row["image"] == "a.jpg" and row["images"] == ["a.jpg"]
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (800, 40, 840)
    assert row["started_at"].timestamp() == pytest.approx(1_700_000_000.5)


async def test_no_temp_file_stays_after_a_flush(tmp_path):
    sink = Sink(tmp_path, OutputConfig(), "run1")

    await sink.put(result("a"))
    await sink.flush()

    assert [p.name for p in tmp_path.iterdir()] == ["part-run1-00001.parquet"]


async def test_a_flush_cancelled_midway_still_accounts_for_its_part(tmp_path):
    """A part write that started finishes: its rows are neither lost nor written again."""
    sink = Sink(tmp_path, OutputConfig(), "run1")
    await sink.put(result("a"))

    flush = asyncio.get_running_loop().create_task(sink.flush())
    await asyncio.sleep(0)
    flush.cancel()
    with pytest.raises(asyncio.CancelledError):
        await flush
    await sink.flush()

    assert read_output(tmp_path).column("id").to_pylist() == ["a"]
    assert sink.committed_rows == 1


async def test_parts_with_different_extra_columns_read_back_together(tmp_path):
    sink = Sink(tmp_path, OutputConfig(rows_per_part=1), "run1")

    await sink.put(result("a"))
    await sink.put(result("b", camera="x100"))

    table = read_output(tmp_path)
    assert dict(zip(table.column("id").to_pylist(), table.column("camera").to_pylist())) == {
        "a": None,
        "b": "x100",
    }


async def test_rows_put_while_a_part_is_written_wait_for_the_next_full_part(tmp_path):
    """Fast workers must not turn every full part into a trickle of tiny parts of what arrived meanwhile."""
    sink = Sink(tmp_path, OutputConfig(rows_per_part=10), "run1")

    async def worker(w: int) -> None:
        for n in range(25):
            await sink.put(result(f"w{w}-r{n}"))
            await asyncio.sleep(0)  # let the others put rows while a part is being written

    await asyncio.gather(*(worker(w) for w in range(4)))
    await sink.flush()

    sizes = [pq.read_metadata(p).num_rows for p in part_files(tmp_path)]
    assert sum(sizes) == 100 and sizes == [10] * 10


def test_a_file_written_a_table_at_a_time_appears_whole_only_when_committed(tmp_path):
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)])
    writer = ParquetFileWriter(tmp_path / "rows.parquet", schema)

    for chunk in (["a", "b"], ["c"]):
        writer.write(pa.table({"id": chunk}, schema=schema))
    before = sorted(p.name for p in tmp_path.iterdir())
    writer.commit()

    assert before == [".tmp-rows.parquet"]  # readers skip dot files
    assert pq.read_table(tmp_path / "rows.parquet").column("id").to_pylist() == ["a", "b", "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.parquet"]


def test_a_discarded_file_leaves_nothing_behind(tmp_path):
    schema = pa.schema([pa.field("id", pa.string(), nullable=False)])
    writer = ParquetFileWriter(tmp_path / "rows.parquet", schema)

    writer.write(pa.table({"id": ["a"]}, schema=schema))
    writer.discard()

    assert list(tmp_path.iterdir()) == []


def test_a_new_part_never_replaces_an_existing_one(tmp_path):
    """Ray workers share an output: a part name taken twice fails rather than losing the first part's rows."""
    first = rows_to_table([{"id": "a", "status": "ok"}], schema_with_extras([]))
    second = rows_to_table([{"id": "b", "status": "ok"}], schema_with_extras([]))
    write_new_part(tmp_path, "part-x.parquet", first)

    with pytest.raises(FileExistsError):
        write_new_part(tmp_path, "part-x.parquet", second)

    assert read_output(tmp_path).column("id").to_pylist() == ["a"]
    assert [p.name for p in tmp_path.iterdir()] == ["part-x.parquet"]  # no temp file left behind


async def test_rows_of_a_part_that_could_not_be_written_are_committed_by_the_next_flush(
    tmp_path, monkeypatch
):
    """A full disk fails the part; its rows stay buffered, in order, each with its own extra columns."""
    import pipeline.sink

    real_write_part = pipeline.sink.write_part
    calls = 0

    def full_disk_once(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError(28, "No space left on device")
        return real_write_part(*args)

    monkeypatch.setattr(pipeline.sink, "write_part", full_disk_once)
    sink = Sink(tmp_path, OutputConfig(rows_per_part=10), "run1")
    await sink.put(result("a"))
    await sink.put(result("b", camera="x100"))
    with pytest.raises(OSError):
        await sink.flush()
    await sink.put(result("c", lens="35mm"))
    await sink.flush()

    rows = read_output(tmp_path).to_pylist()
    assert [(r["id"], r["camera"], r["lens"]) for r in rows] == [
        ("a", None, None),
        ("b", "x100", None),
        ("c", None, "35mm"),
    ]
    assert sink.committed_rows == 3 and sink.buffered_rows == 0
