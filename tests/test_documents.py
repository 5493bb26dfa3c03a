"""Input parsing (SPEC section 2): every format, every refusal and its message."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from embedd.errors import InputRejected
from embedd.files import documents
from embedd.files.documents import MAX_REPORTED, Record, parse_document


def reject(name: str, data: bytes) -> InputRejected:
    with pytest.raises(InputRejected) as info:
        parse_document(name, data)
    return info.value


def test_plain_text_is_one_record_named_after_the_file() -> None:
    """A .txt file is one record, id = file name, text exactly as written."""
    text = "  Hello,\r\nworld \u2028 caf\u00e9\n\n"
    assert parse_document("a.txt", text.encode()) == [Record("a.txt", text, None, None)]


def test_file_without_extension_and_markdown_are_plain_text() -> None:
    """Names without .json/.jsonl are plain text, JSON-looking content included."""
    assert parse_document("README", b'{"text": "x"}')[0].text == '{"text": "x"}'
    assert parse_document("notes.md", b"# t")[0].id == "notes.md"


def test_leading_bom_is_dropped_and_only_that() -> None:
    """Only a leading UTF-8 BOM is removed; one in the middle stays."""
    data = b"\xef\xbb\xbfab\xef\xbb\xbfc"
    assert parse_document("a.txt", data)[0].text == "ab\ufeffc"
    jl = b'\xef\xbb\xbf{"text": "x"}\n'
    assert parse_document("a.jsonl", jl)[0].text == "x"


def test_jsonl_ids_meta_and_blank_lines() -> None:
    """JSONL: explicit ids kept, missing ids are physical line numbers, blank lines counted."""
    data = b'{"id": "a", "text": "one", "lang": "en"}\n\n  \r\n{"text": "two"}\n{"id": 7, "text": "t"}\n'
    recs = parse_document("x.jsonl", data)
    assert recs == [
        Record("a", "one", {"lang": "en"}, 1),
        Record("4", "two", None, 4),
        Record("7", "t", None, 5),
    ]


def test_jsonl_text_is_not_normalised() -> None:
    """Escapes decode to the exact text, including U+2028 and CRs inside strings."""
    text = "a\r\nb\u2028c  "
    data = (json.dumps({"text": text}, ensure_ascii=False) + "\r\n").encode()
    assert parse_document("x.jsonl", data)[0].text == text


def test_extension_case_is_ignored() -> None:
    """`.JSONL` and `.Json` parse like their lower-case forms."""
    assert parse_document("X.JSONL", b'{"text": "a"}')[0].id == "1"
    assert parse_document("X.Json", b'[{"text": "a"}, {"text": "b"}]')[1].id == "2"


def test_json_array_ids_are_positions() -> None:
    """JSON: an array of objects; a missing id is the 1-based index."""
    data = b'[{"text": "a"}, {"id": "k", "text": "b", "m": [1]}, {"text": "c"}]'
    assert parse_document("x.json", data) == [
        Record("1", "a", None, None),
        Record("k", "b", {"m": [1]}, None),
        Record("3", "c", None, None),
    ]


def test_invalid_utf8_names_byte_offset() -> None:
    """Invalid UTF-8 is refused with its byte offset in the original file."""
    err = reject("a.txt", b"\xef\xbb\xbfabc\xffdef")
    assert "a.txt" in err.message
    assert "byte offset 6" in err.message


def test_nul_byte_names_byte_offset() -> None:
    """A raw NUL byte is refused with its offset; a \\u0000 escape is refused by line."""
    err = reject("a.txt", b"abc\x00")
    assert err.message == "a.txt contains a NUL byte at byte offset 3."
    err = reject("a.jsonl", b'{"text": "a"}\n{"text": "b\\u0000"}\n')
    assert "line 2" in err.message
    assert "NUL" in err.message


@pytest.mark.parametrize("text", ["", "   \n\t", "\u3000"])
def test_empty_or_whitespace_plain_text(text: str) -> None:
    """An empty or whitespace-only text file is refused."""
    err = reject("e.txt", text.encode())
    assert "e.txt" in err.message
    assert "empty or whitespace" in err.message


def test_whitespace_record_names_line_and_lists_records() -> None:
    """A whitespace-only text in JSONL names its line and appears in records."""
    err = reject("a.jsonl", b'{"id": "a", "text": "ok"}\n{"id": "b", "text": " "}\n')
    assert err.message.startswith("a.jsonl line 2: text is empty or whitespace only")
    assert err.records == [{"id": "b", "line": 2, "error": "text is empty or whitespace only"}]


def test_malformed_line_names_line_and_json_error() -> None:
    """A malformed JSON line names its line number and the decoder's complaint."""
    err = reject("a.jsonl", b'{"text": "a"}\n\n{"text": "b",}\n')
    assert "a.jsonl line 3: malformed JSON" in err.message
    assert "column" in err.message
    assert err.records[0]["line"] == 3


def test_a_bom_starting_a_later_line_is_named_as_such() -> None:
    """A byte order mark is dropped from the file's start only: one that starts a
    later line is that line's problem, named as json.loads names it."""
    err = reject("a.jsonl", b'{"text": "a"}\n\xef\xbb\xbf{"text": "b"}\n')
    assert err.records[0]["line"] == 2
    assert "malformed JSON: Unexpected UTF-8 BOM" in err.records[0]["error"]


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        (b'["a"]', "expected a JSON object, found an array"),
        (b'"x"', "expected a JSON object, found a string"),
        (b'{"id": "a"}', 'no "text" key'),
        (b'{"text": 5}', "text must be a string, found a number"),
        (b'{"text": null}', "text must be a string, found null"),
        (b'{"id": 1.5, "text": "a"}', "id must be a string or an integer"),
        (b'{"id": true, "text": "a"}', "found a boolean"),
        (b'{"id": "", "text": "a"}', "id is empty"),
        (b'{"text": "a", "x": NaN}', "NaN is not valid JSON"),
        (b'{"text": "a", "text": "b"}', "appears twice"),
    ],
)
def test_bad_objects_are_refused(line: bytes, needle: str) -> None:
    """Non-objects, missing or non-string text, bad ids and non-standard JSON are refused."""
    err = reject("b.jsonl", b'{"text": "fine"}\n' + line + b"\n")
    assert err.message.startswith("b.jsonl line 2: ")
    assert needle in err.message


def test_duplicate_id_names_both_lines() -> None:
    """A duplicate id names both lines; an int id collides with the same string."""
    err = reject("d.jsonl", b'{"id": "7", "text": "a"}\n{"text": "b"}\n{"id": 7, "text": "c"}\n')
    assert err.message == "d.jsonl line 3: duplicate id '7' (lines 1 and 3)."


def test_default_id_can_collide_with_explicit_id() -> None:
    """A line-number id that equals an explicit id earlier in the file is a duplicate."""
    err = reject("d.jsonl", b'{"id": "2", "text": "a"}\n{"text": "b"}\n')
    assert "duplicate id '2' (lines 1 and 2)" in err.message


def test_all_record_problems_are_listed_and_counted() -> None:
    """Every bad line is reported in records; the message counts the others."""
    data = b'{"text": ""}\nnope\n{"text": "ok"}\n{"id": 3}\n'
    err = reject("m.jsonl", data)
    assert [r["line"] for r in err.records] == [1, 2, 4]
    assert err.message.endswith("(and 2 more problems).")


def test_reported_problems_are_capped() -> None:
    """A file of many bad lines lists at most MAX_REPORTED records but counts all."""
    data = b"x\n" * (MAX_REPORTED + 5)
    err = reject("m.jsonl", data)
    assert len(err.records) == MAX_REPORTED
    assert f"(and {MAX_REPORTED + 4} more problems)" in err.message


def test_json_not_an_array() -> None:
    """A .json file must hold an array."""
    err = reject("o.json", b'{"text": "a"}')
    assert err.message == "o.json must hold a JSON array of objects, found an object."


def test_json_syntax_error_names_line_and_column() -> None:
    """A broken .json names the line and column of the error."""
    err = reject("o.json", b'[\n{"text": "a"},\n]')
    assert "o.json is not valid JSON" in err.message
    assert "line 3, column 1" in err.message


def test_json_item_problems_name_item() -> None:
    """Per-record problems in .json name the 1-based item."""
    err = reject("o.json", b'[{"text": "a"}, {"text": "a", "id": "1"}]')
    assert err.message == "o.json item 2: duplicate id '1' (items 1 and 2)."
    assert err.records[0]["item"] == 2


@pytest.mark.parametrize(
    ("name", "data"), [("e.jsonl", b""), ("e.jsonl", b"\n \n"), ("e.json", b"[]")]
)
def test_file_with_no_records(name: str, data: bytes) -> None:
    """A JSONL or JSON file without records is refused."""
    assert reject(name, data).message == f"{name} has no records."


def test_deeply_nested_json_is_refused_not_crashing() -> None:
    """Pathological nesting is a malformed line, not a RecursionError."""
    deep = b'{"text": "a", "m": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    err = reject("n.jsonl", deep)
    assert "line 1: JSON nested too deep" in err.message


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (rb'{"id": "a", "text": "x\ud800y"}', "text contains a lone surrogate escape (\\ud800)"),
        (rb'{"id": "\udfff", "text": "xy"}', "id contains a lone surrogate escape"),
        (rb'{"text": "xy", "\ud800": 1}', "a key other than id and text holds a lone surrogate"),
        (
            rb'{"text": "xy", "m": ["\udc00"]}',
            "a key other than id and text holds a lone surrogate",
        ),
        (
            b'{"text": "xy", "m": ' + b"[" * 400 + b"]" * 400 + b"}",
            "the extra keys are nested too deep",
        ),
    ],
)
def test_unstorable_json_strings_are_refused_with_their_line(line: bytes, error: str) -> None:
    """A lone surrogate escape (in the text, the id or any other key) or extra keys
    nested deeper than can be stored are refused with the line, not crashing the
    daemon later when the text is encoded as UTF-8 or the meta written."""
    err = reject("s.jsonl", b'{"id": "ok", "text": "fine"}\n' + line + b"\n")
    assert err.message.startswith(f"s.jsonl line 2: {error}")
    assert err.records[0]["line"] == 2
    json.dumps(err.records, ensure_ascii=False).encode("utf-8")  # the reason is storable


def test_a_surrogate_pair_escape_is_a_character() -> None:
    """A proper pair of escapes is one character and is accepted."""
    [record] = parse_document("p.jsonl", rb'{"id": "a", "text": "\ud83d\ude00 ok"}')
    assert record.text == "\U0001f600 ok"


# ---- streamed reading (SPEC §9, claims stream): same records and messages as whole ----


def big_array(items: int) -> str:
    """A .json array of `items` objects over many lines and several read windows."""
    rows = [f'{{"id": "r{n}", "text": "word {n} {"é" * (n % 7)}"}}' for n in range(items)]
    return "[\n" + ",\n  ".join(rows) + "\n]\n"


def whole_json_message(name: str, text: str) -> str:
    try:
        json.loads(text)
    except json.JSONDecodeError as exc:
        return f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
    raise AssertionError("the document is valid")


def test_a_json_array_over_many_read_windows_gives_every_item() -> None:
    """A 2.7 MB array (read 1 MiB at a time, cut anywhere, even inside a character)
    gives the same records as parsing it whole, from bytes or from an open file."""
    text = big_array(60_000)
    data = text.encode()
    assert len(data) > 2 * 2**20
    expected = [
        Record(o["id"], o["text"], None, None) for o in json.loads(text)
    ]  # fmt: skip
    assert parse_document("big.json", data) == expected
    assert parse_document("big.json", io.BytesIO(b"\xef\xbb\xbf" + data)) == expected


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace(',\n  {"id": "r30000"', ',,\n  {"id": "r30000"'),  # no value
        lambda t: t.replace('},\n  {"id": "r40000"', '}\n  {"id": "r40000"'),  # no comma
        lambda t: t.rstrip() + " x",  # extra data after the array
        lambda t: t.rstrip()[:-1],  # the array never closes
        lambda t: t.rstrip()[:-1] + ',\n  {"text": "never closed',  # unterminated string
        lambda t: t.replace('"r50000"', '"r50000" "x"'),  # a broken object far in
        lambda t: t.rstrip()[:-1] + ",\n]",  # a trailing comma
        lambda t: t.replace('"r30000"', "tru"),  # a cut literal
    ],
)
def test_a_streamed_json_error_names_the_line_and_column_of_the_whole_file(
    edit: Any,
) -> None:
    """Errors anywhere in a multi-window .json name the same line and column (and
    message) as `json.loads` of the whole file."""
    text = edit(big_array(60_000))
    assert reject("e.json", text.encode()).message == whole_json_message("e.json", text)


def test_a_streamed_json_refuses_nan_and_repeated_keys_far_in() -> None:
    text = big_array(60_000)
    err = reject("n.json", text.replace('"r45000"', '"r45000", "v": NaN').encode())
    assert err.message == "n.json is not valid JSON: NaN is not valid JSON."
    err = reject("k.json", text.replace('"r45000"', '"r45000", "id": "x"').encode())
    assert err.message == "k.json is not valid JSON: key 'id' appears twice in one object."


def test_a_nul_or_bad_utf8_far_in_is_reported_before_any_syntax_error() -> None:
    """As when the file was read whole: a NUL anywhere first, then bad UTF-8."""
    text = big_array(60_000).encode()
    cut = len(text) - 100
    broken = b"[1,,]" + text[5:cut] + b"\xff" + text[cut:]
    assert reject("u.json", broken).message == (
        f"u.json is not valid UTF-8: byte offset {cut} (invalid start byte)."
    )
    assert reject("z.json", broken[:-50] + b"\x00" + broken[-50:]).message == (
        f"z.json contains a NUL byte at byte offset {len(broken) - 50}."
    )
    lines = b'{"text": "a"}\n' * 200_000
    assert reject("z.jsonl", lines + b"\x00").message == (
        f"z.jsonl contains a NUL byte at byte offset {len(lines)}."
    )


def test_a_duplicate_far_apart_is_found_after_the_ids_are_compacted() -> None:
    """Ids are kept as hashes in a sorted array once there are many; a repeat of an
    early id near the end is still named with both lines."""
    lines = [json.dumps({"id": f"r{n}", "text": "t"}) for n in range(150_000)]
    lines[140_000] = json.dumps({"id": "r5", "text": "t"})
    err = reject("far.jsonl", "\n".join(lines).encode())
    assert err.message == "far.jsonl line 140001: duplicate id 'r5' (lines 6 and 140001)."


def test_colliding_hashes_are_confirmed_against_the_ids_themselves() -> None:
    """Two different ids that share a hash are not duplicates; the real duplicates
    among them are named with the first line of their id, in file order."""
    from embedd.files.documents import _Collector, _SeenIds

    ids = [f"id{n}" for n in range(40)] + ["id3", "id7", "id3"]
    data = "\n".join(json.dumps({"id": i, "text": "t"}) for i in ids).encode()
    records = {"ok": [], "bad": []}
    for case, source in (("ok", b"\n".join(data.split(b"\n")[:40])), ("bad", data)):
        f = io.BytesIO(source)
        values = documents._jsonl_values("c.jsonl", f)
        out = _Collector("c.jsonl", "line", lambda f=f: documents._valid_ids(
            documents._jsonl_values("c.jsonl", f)))  # fmt: skip
        out.seen = _SeenIds(bits=2)  # 4 hash values for 40 ids: collisions everywhere
        for where, obj, _ in values:
            if out.check(where, obj, where) is not None:
                records[case].append(where)
        if case == "ok":
            out.finish()
            continue
        with pytest.raises(InputRejected) as info:
            out.finish()
        assert info.value.message == (
            "c.jsonl line 41: duplicate id 'id3' (lines 4 and 41) (and 2 more problems)."
        )
        assert [(p["line"], p["error"]) for p in info.value.records] == [
            (41, "duplicate id 'id3' (lines 4 and 41)"),
            (42, "duplicate id 'id7' (lines 8 and 42)"),
            (43, "duplicate id 'id3' (lines 4 and 43)"),
        ]


@pytest.mark.parametrize(
    "text",
    ['["a"', '[{"text": "a"}', "[1", "[", "", "  \n ", "[] x", "[1,]", '\t[{"id": 1, "text": "b"}',
     '[{"text": "a"} {"text": "b"}]', '[{"text": "a"},\n tru', "[1e", '["\\u12'],
)  # fmt: skip
def test_a_json_cut_short_or_broken_names_the_place_json_loads_would(text: str) -> None:
    """Small documents ending inside or right after a value: the streamed reading's
    position is that of the whole text (a value ending the file is not misplaced)."""
    assert reject("s.json", text.encode()).message == whole_json_message("s.json", text)
