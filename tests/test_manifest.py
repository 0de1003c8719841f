"""manifest.py: every manifest row becomes an ImageTask or, when it is bad, a ManifestError in its place."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import RequestConfig
from pipeline.manifest import Skipped, count_rows, manifest_base_dir, read_manifest
from pipeline.records import ConfigError, ImageTask, ManifestError

REQUEST = RequestConfig(prompt="Describe this image.", detail="auto")


def write_csv(path: Path, rows: list[list[str]], *, bom: bool = False) -> Path:
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def write_jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def read_all(path: Path) -> list[ImageTask | ManifestError]:
    return list(read_manifest(path, REQUEST))


def tasks_only(items: list[ImageTask | ManifestError]) -> list[ImageTask]:
    assert all(isinstance(item, ImageTask) for item in items), items
    return items  # type: ignore[return-value]


# CSV


@pytest.mark.parametrize("bom", [False, True], ids=["plain", "with-bom"])
def test_csv_rows_become_tasks_with_or_without_a_byte_order_mark(tmp_path, bom):
    manifest = write_csv(
        tmp_path / "m.csv", [["id", "image"], ["cat", "cat.jpg"], ["dog", "pets/dog.png"]], bom=bom
    )

    tasks = tasks_only(read_all(manifest))

    assert [(t.row_id, t.images, t.line) for t in tasks] == [
        ("cat", ("cat.jpg",), 2),
        ("dog", ("pets/dog.png",), 3),
    ]


def test_empty_prompt_and_detail_cells_use_the_config(tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv",
        [
            ["id", "image", "prompt", "detail"],
            ["a", "a.jpg", "", ""],
            ["b", "b.jpg", "Count the cats.", "LOW"],
        ],
    )

    a, b = tasks_only(read_all(manifest))

    assert (a.prompt, a.detail) == (REQUEST.prompt, REQUEST.detail)
    assert (b.prompt, b.detail) == ("Count the cats.", "low")


def test_extra_csv_columns_pass_through_as_they_are(tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv", [["id", "image", "license", "source"], ["a", "a.jpg", "CC0-1.0", ""]]
    )

    (task,) = tasks_only(read_all(manifest))

    assert task.extra == {"license": "CC0-1.0", "source": ""}


def test_csv_images_column_takes_a_json_array(tmp_path):
    manifest = write_csv(
        tmp_path / "m.csv", [["id", "images"], ["pair", '["left.jpg", "right.jpg"]'], ["bad", "left.jpg"]]
    )

    pair, bad = read_all(manifest)

    assert isinstance(pair, ImageTask) and pair.images == ("left.jpg", "right.jpg")
    assert isinstance(bad, ManifestError) and bad.row_id == "bad" and "JSON array" in bad.reason


def test_csv_row_with_the_wrong_number_of_cells_is_a_bad_row_and_the_rest_still_come(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image\na,a.jpg\nb,b.jpg,surplus\nc,c.jpg\n")

    a, b, c = read_all(manifest)

    assert isinstance(b, ManifestError) and (b.row_id, b.line) == ("line-3", 3)
    assert [a.row_id, c.row_id] == ["a", "c"]


def test_csv_line_is_where_the_row_starts_even_after_multiline_cells_and_blank_lines(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text('id,image,prompt\na,a.jpg,"first line\nsecond line"\n\nb,b.jpg,\n')

    a, b = tasks_only(read_all(manifest))

    assert (a.line, a.prompt) == (2, "first line\nsecond line")
    assert b.line == 5


def test_rows_of_empty_cells_that_spreadsheets_leave_are_skipped(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("id,image,prompt\na,a.jpg,\n,,\n,,\n")

    tasks = tasks_only(read_all(manifest))

    assert [t.row_id for t in tasks] == ["a"]


def test_a_data_url_longer_than_csvs_default_cell_limit_is_read_whole(tmp_path):
    url = "data:image/png;base64," + "A" * 300_000  # csv refuses cells over 128 KiB by default
    manifest = write_csv(tmp_path / "m.csv", [["id", "image"], ["inline", url]])

    (task,) = tasks_only(read_all(manifest))

    assert task.images == (url,)


def test_csv_without_an_image_column_stops_the_run_naming_the_file(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [["id", "picture"], ["a", "a.jpg"]])

    with pytest.raises(ConfigError, match=r"m\.csv: no 'image' or 'images' column"):
        read_all(manifest)


def test_a_csv_line_that_is_not_utf8_is_one_error_row_naming_its_line_and_byte_offset(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"id,image\nok-1,a.jpg\ncaf\xe9,caf\xe9.jpg\nok-2,b.jpg\n")

    items = read_all(manifest)

    assert [item.row_id for item in items] == ["ok-1", "line-3", "ok-2"]
    bad = items[1]
    assert isinstance(bad, ManifestError) and bad.line == 3 and bad.kind == "bad_manifest_row"
    assert "line 3: not UTF-8 text: byte 0xe9 at byte offset 23" in str(bad)  # 9 + 11 + len(b"caf"), from 0
    assert isinstance(items[0], ImageTask) and isinstance(items[2], ImageTask)


def test_a_bad_byte_outside_the_id_keeps_the_rows_own_id(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"id,image,prompt\nrow-7,a.jpg,d\xe9crire\n")

    (bad,) = read_all(manifest)

    assert isinstance(bad, ManifestError) and bad.row_id == "row-7"
    assert "byte 0xe9 at byte offset 29" in str(bad)  # 16 + len(b"row-7,a.jpg,d")


def test_a_bad_byte_inside_a_quoted_multiline_cell_fails_only_that_record(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b'id,image,prompt\nr1,a.jpg,"two\nlin\xe9s"\nr2,b.jpg,x\n')

    items = read_all(manifest)

    assert [(item.row_id, item.line) for item in items] == [("r1", 2), ("r2", 4)]
    assert isinstance(items[0], ManifestError) and "on line 3" in str(items[0])
    assert isinstance(items[1], ImageTask)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32"])
def test_csv_in_a_wide_encoding_stops_the_run_naming_the_file(tmp_path, encoding):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("id,image\ncafé,café.jpg\n".encode(encoding))  # with its byte-order mark

    with pytest.raises(ConfigError, match=r"m\.csv: UTF-16 text, not UTF-8"):
        read_all(manifest)


def test_csv_whose_header_is_not_utf8_stops_the_run_naming_the_file(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_bytes(b"id,im\xe1ge\na,a.jpg\n")

    with pytest.raises(
        ConfigError, match=r"m\.csv: the header row is not UTF-8 text \(byte 0xe1 at byte offset 5\)"
    ):
        read_all(manifest)


def test_a_jsonl_line_that_is_not_utf8_is_one_error_row_naming_its_line_and_byte_offset(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(
        b'{"id": "a", "image": "a.jpg"}\n{"id": "b", "image": "caf\xe9.jpg"}\n{"image": "c.jpg"}\n'
    )

    items = read_all(manifest)

    assert isinstance(items[1], ManifestError) and items[1].row_id == "b" and items[1].line == 2
    assert "byte 0xe9 at byte offset 55" in str(items[1])  # 30 + len(b'{"id": "b", "image": "caf')
    assert isinstance(items[0], ImageTask) and isinstance(items[2], ImageTask)


# Ids


def test_id_is_derived_from_the_images_when_absent_and_is_the_same_on_every_run(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [["image"], ["photos/cat.jpg"]])
    expected = "img-" + hashlib.sha256(b"photos/cat.jpg").hexdigest()[:16]

    first, second = read_all(manifest), read_all(manifest)

    assert [t.row_id for t in tasks_only(first)] == [t.row_id for t in tasks_only(second)] == [expected]


def test_empty_id_cell_is_derived_like_a_missing_one(tmp_path):
    with_column = write_csv(tmp_path / "a.csv", [["id", "images"], ["", '["x.jpg", "y.jpg"]']])
    without = write_jsonl(tmp_path / "b.jsonl", [{"images": ["x.jpg", "y.jpg"]}])

    (a,), (b,) = tasks_only(read_all(with_column)), tasks_only(read_all(without))

    assert a.row_id == b.row_id == "img-" + hashlib.sha256(b"x.jpg\ny.jpg").hexdigest()[:16]


def test_whole_number_ids_are_accepted_as_text(tmp_path):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": 17, "image": "a.jpg"}])

    (task,) = tasks_only(read_all(manifest))

    assert task.row_id == "17"


def test_duplicate_ids_are_yielded_as_they_come(tmp_path):
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "a", "image": "1.jpg"}, {"id": "a", "image": "2.jpg"}]
    )

    tasks = tasks_only(read_all(manifest))

    assert [t.images for t in tasks] == [("1.jpg",), ("2.jpg",)]


# Bad rows


def test_jsonl_bad_line_becomes_an_error_and_the_other_rows_still_come(tmp_path):
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "a", "image": "a.jpg"}, "{not json", {"id": "c", "image": "c.jpg"}]
    )

    a, bad, c = read_all(manifest)

    assert isinstance(bad, ManifestError)
    assert (bad.row_id, bad.file, bad.line) == ("line-2", str(manifest), 2)
    assert "not valid JSON" in bad.reason
    assert (a.row_id, c.row_id) == ("a", "c")


def test_jsonl_blank_lines_are_skipped_and_lines_stay_physical(tmp_path):
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "a", "image": "a.jpg"}, "", "   ", {"id": "b", "image": "b.jpg"}]
    )

    tasks = tasks_only(read_all(manifest))

    assert [(t.row_id, t.line) for t in tasks] == [("a", 1), ("b", 4)]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ('["a.jpg"]', "must be a JSON object"),
        ({"id": "x"}, "no image"),
        ({"id": "x", "image": ""}, "no image"),
        ({"id": "x", "images": "a.jpg"}, "JSON array"),
        ({"id": "x", "images": ["a.jpg", 3]}, "list of non-empty strings"),
        ({"id": "x", "image": ["a.jpg"]}, "image must be text"),
        ({"id": "x", "image": "a.jpg", "images": ["b.jpg"]}, "not both"),
        ({"id": "x", "image": "a.jpg", "detail": "ultra"}, "detail must be low, high or auto"),
        ({"id": "x", "image": "a.jpg", "prompt": 42}, "prompt must be text"),
        ({"id": 1.5, "image": "a.jpg"}, "id must be text or a whole number"),
    ],
)
def test_bad_rows_become_manifest_errors(tmp_path, row, reason):
    manifest = write_jsonl(tmp_path / "m.jsonl", [row])

    (error,) = read_all(manifest)

    assert isinstance(error, ManifestError) and reason in error.reason


def test_a_bad_row_keeps_its_id_when_it_has_one_else_is_named_by_its_line(tmp_path):
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "keep", "image": "a.jpg", "detail": "x"}, {"prompt": "?"}]
    )

    with_id, without = read_all(manifest)

    assert (with_id.row_id, without.row_id) == ("keep", "line-2")


def test_jsonl_extra_values_pass_through_as_compact_json_text(tmp_path):
    row = {
        "id": "a",
        "image": "a.jpg",
        "meta": {"k": [1, 2]},
        "n": 3,
        "flag": True,
        "gone": None,
        "who": "Zoë",
    }
    manifest = write_jsonl(tmp_path / "m.jsonl", [row])

    (task,) = tasks_only(read_all(manifest))

    assert task.extra == {"meta": '{"k":[1,2]}', "n": "3", "flag": "true", "gone": None, "who": "Zoë"}


# Parquet and folders


def test_parquet_list_column_and_typed_extras_stream_across_batches(tmp_path):
    rows = 2500  # more than two batches of 1024
    table = pa.table(
        {
            "id": [f"r{n}" for n in range(rows)],
            "images": [[f"{n}a.jpg", f"{n}b.jpg"] for n in range(rows)],
            "score": pa.array(range(rows), pa.int64()),
            "note": [None] * rows,
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")

    tasks = tasks_only(read_all(tmp_path / "m.parquet"))

    assert len(tasks) == rows == count_rows(tmp_path / "m.parquet")
    assert (tasks[2000].row_id, tasks[2000].images, tasks[2000].line) == (
        "r2000",
        ("2000a.jpg", "2000b.jpg"),
        2001,
    )
    assert tasks[2000].extra == {"score": "2000", "note": None}


def test_folder_mode_yields_every_image_with_its_relative_path_as_id(tmp_path):
    for name in [
        "b.jpg",
        "a.PNG",
        "notes.txt",
        ".hidden.jpg",
        "sub/z.webp",
        "sub/deeper/y.tif",
        ".cache/x.jpg",
    ]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")

    tasks = tasks_only(read_all(tmp_path))

    assert [t.row_id for t in tasks] == ["a.PNG", "b.jpg", "sub/z.webp", "sub/deeper/y.tif"]
    assert all(t.images == (t.row_id,) and t.prompt == REQUEST.prompt for t in tasks)
    assert [t.line for t in tasks] == [1, 2, 3, 4]


def test_a_file_name_that_is_not_utf8_is_an_error_row_and_the_folder_goes_on(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"x")  # Latin-1 bytes on a UTF-8 file system
    (tmp_path / "z.jpg").write_bytes(b"x")

    items = read_all(tmp_path)

    assert [item.row_id for item in items] == ["a.jpg", "caf\\xe9.jpg", "z.jpg"]
    assert isinstance(items[1], ManifestError) and "the file name is not UTF-8: rename it" in str(items[1])
    assert list(read_manifest(tmp_path, REQUEST, skip={"caf\\xe9.jpg"}))[1] == Skipped("caf\\xe9.jpg", 2)


# The manifest as a whole


def test_unknown_manifest_kind_stops_the_run_naming_the_file(tmp_path):
    (tmp_path / "rows.xlsx").write_bytes(b"PK")

    with pytest.raises(ConfigError, match=r"rows\.xlsx: unknown manifest kind"):
        read_manifest(tmp_path / "rows.xlsx", REQUEST)


def test_missing_manifest_stops_the_run_at_once(tmp_path):
    with pytest.raises(ConfigError, match="manifest not found"):
        read_manifest(tmp_path / "nowhere.csv", REQUEST)


def test_a_file_that_is_not_parquet_stops_the_run(tmp_path):
    (tmp_path / "m.parquet").write_text("id,image\n")

    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        read_all(tmp_path / "m.parquet")


def test_count_rows_counts_data_lines_cheaply(tmp_path):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("id,image\na,a.jpg\nb,b.jpg")  # no newline at the end
    jsonl_path = write_jsonl(tmp_path / "m.jsonl", [{"image": "a.jpg"}] * 3)

    counts = count_rows(csv_path), count_rows(jsonl_path), count_rows(tmp_path)

    assert counts == (2, 3, None)


def test_base_dir_is_the_manifests_folder_or_the_folder_itself(tmp_path):
    manifest = write_csv(tmp_path / "m.csv", [["image"]])

    assert (manifest_base_dir(manifest), manifest_base_dir(tmp_path)) == (tmp_path, tmp_path)


_cell_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(st.tuples(_cell_text.filter(lambda s: s.strip() == s), _cell_text, _cell_text), max_size=8)
)
def test_any_csv_text_round_trips_into_tasks(tmp_path, rows):
    """Quotes, commas and line breaks in cells come back as written; a blank prompt means the config's."""
    manifest = write_csv(
        tmp_path / "m.csv",
        [["id", "image", "prompt", "license"]]
        + [[i, f"{n}.jpg", p, lic] for n, (i, p, lic) in enumerate(rows)],
    )

    tasks = tasks_only(read_all(manifest))

    assert [t.images for t in tasks] == [(f"{n}.jpg",) for n in range(len(rows))]
    assert [t.row_id for t in tasks] == [
        i or "img-" + hashlib.sha256(f"{n}.jpg".encode()).hexdigest()[:16] for n, (i, _, _) in enumerate(rows)
    ]
    assert [t.prompt for t in tasks] == [p if p.strip() else REQUEST.prompt for _, p, _ in rows]
    assert [t.extra["license"] for t in tasks] == [lic for _, _, lic in rows]


def test_rows_whose_id_is_in_skip_come_as_markers_without_parsing(tmp_path):
    """A resumed run does not parse the rows it will not send (their bad cells included)."""
    from pipeline.manifest import Skipped

    path = write_csv(
        tmp_path / "m.csv",
        [["id", "image", "detail"], ["done", "a.png", "not-a-detail"], ["new", "b.png", ""]],
    )

    items = list(read_manifest(path, RequestConfig(), skip={"done"}))

    assert items[0] == Skipped("done", 2)
    assert isinstance(items[1], ImageTask) and items[1].row_id == "new"


def test_grouped_skipping_counts_committed_csv_rows_in_blocks_and_keeps_the_others_lines(tmp_path):
    """A resumed run gets runs of committed rows as one marker each; the rows between keep their lines."""
    from pipeline.idset import IdSet

    rows = [["id", "image"], *([f"r{n}", f"{n}.jpg"] for n in range(1000))]
    rows[501] = ["  r500 ", "500.jpg"]  # blanks around a committed id: the parser strips them
    path = write_csv(tmp_path / "m.csv", rows)  # csv.writer ends lines with \r\n
    path.write_bytes(path.read_bytes() + b"new,caf\xe9.jpg\r\nlast,z.jpg")
    committed = IdSet(f"r{n}" for n in range(1000) if n not in (10, 700))

    items = list(read_manifest(path, REQUEST, committed, group_skipped=True))

    served = [(item.row_id, item.line) for item in items if not isinstance(item, Skipped)]
    assert served == [("r10", 12), ("r700", 702), ("new", 1002), ("last", 1003)]
    assert sum(item.rows for item in items if isinstance(item, Skipped)) == 998
    assert "byte 0xe9 at byte offset" in str(items[-2])
    offset = int(str(items[-2]).split("byte offset ")[1].split(":")[0])
    assert path.read_bytes()[offset] == 0xE9


@pytest.mark.parametrize("block_bytes", [64, 1024 * 1024])
def test_grouped_skipping_gives_the_same_rows_as_one_marker_per_row(tmp_path, monkeypatch, block_bytes):
    """Small blocks mix quote-free blocks (checked whole) with blocks holding multi-line cells."""
    import pipeline.manifest_text

    monkeypatch.setattr(pipeline.manifest_text, "BLOCK_BYTES", block_bytes)
    rows = [
        ["id", "image", "prompt"],
        *([f"r{n}", f"{n}.jpg", "a\nb" if n % 50 == 0 else "p"] for n in range(300)),
    ]
    path = write_csv(tmp_path / "m.csv", rows)
    committed = {f"r{n}" for n in range(300) if n % 3}

    one_by_one = list(read_manifest(path, REQUEST, committed))
    grouped = list(read_manifest(path, REQUEST, committed, group_skipped=True))

    def served(items):
        return [item for item in items if not isinstance(item, Skipped)]

    assert served(grouped) == served(one_by_one) and len(served(one_by_one)) == 100
    assert sum(item.rows for item in grouped if isinstance(item, Skipped)) == 200
    assert all(item.rows == 1 for item in one_by_one if isinstance(item, Skipped))


def test_grouped_skipping_of_a_parquet_manifest_counts_committed_rows_without_parsing_them(tmp_path):
    path = tmp_path / "m.parquet"
    ids = [f"r{n}" for n in range(3000)]
    pq.write_table(pa.table({"id": ids, "image": [f"{n}.jpg" for n in range(3000)]}), path)

    items = list(read_manifest(path, REQUEST, set(ids) - {"r5", "r2500"}, group_skipped=True))

    assert [(item.row_id, item.line) for item in items if isinstance(item, ImageTask)] == [
        ("r5", 6),
        ("r2500", 2501),
    ]
    assert sum(item.rows for item in items if isinstance(item, Skipped)) == 2998
