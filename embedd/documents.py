"""Parse one input file into records (SPEC section 2). Pure: bytes in, records out.

Formats, chosen by the file name's extension, compared case-insensitively
(`a.JSONL` is JSON Lines like `a.jsonl`; producers on case-insensitive systems
should not be surprised):

- `*.jsonl`: one JSON object a line, `{"id": ..., "text": ...}`. Blank lines
  (only spaces, tabs, CR) are skipped but still counted. A missing `id` becomes
  the 1-based physical line number as a string.
- `*.json`: a JSON array of the same objects; a missing `id` becomes the 1-based
  position in the array as a string.
- anything else: the whole file is one record whose id is the file name.

Decisions the SPEC leaves open:

- An `id` may be a string or a JSON integer (not a boolean); integers are
  converted with `str()`, so `7` and `"7"` are the same id and collide as
  duplicates. Empty ids, floats, `null`, arrays and objects are refused.
- Keys other than `id` and `text` become `meta` (a dict), or `None` when there
  are none.
- JSON is read strictly: `NaN`/`Infinity` and repeated keys inside one object are
  refused, so a manifest can always copy `meta` as standard JSON.
- A NUL character is refused whether it is a raw byte or a `\\u0000` escape in
  a JSON string.

Every problem raises `InputRejected` whose message is one sentence naming the
file and the line (or item, or byte offset). Problems that belong to one record
are all collected (up to `MAX_REPORTED`) into `InputRejected.records` as
`{"id": id-or-None, "line": n, "error": "..."}` (`"item"` instead of `"line"`
for `.json`), and the message names the first one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from embedd.errors import InputRejected

BOM = b"\xef\xbb\xbf"
MAX_REPORTED = 1000  # per-record problems listed in error.json; the rest are counted


@dataclass(frozen=True)
class Record:
    """One text to embed: its id, the exact text, extra keys, and its line (JSONL only)."""

    id: str
    text: str
    meta: dict[str, Any] | None
    line: int | None


class _Problem(Exception):
    """A problem with one record; collected, then reported together."""


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"key {key!r} appears twice in one object")
        result[key] = value
    return result


def _loads(text: str) -> Any:
    """Strict json.loads: no NaN/Infinity, no repeated keys."""
    return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _decode(name: str, data: bytes) -> str:
    """UTF-8 text of the file without a leading BOM; refuses NUL and invalid UTF-8."""
    skip = len(BOM) if data.startswith(BOM) else 0
    nul = data.find(b"\x00", skip)
    if nul >= 0:
        raise InputRejected(f"{name} contains a NUL byte at byte offset {nul}.")
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        # offsets are reported in the original file, BOM included
        raise InputRejected(
            f"{name} is not valid UTF-8: byte offset {exc.start + skip} ({exc.reason})."
        ) from None


# A JSON escape such as "\ud800" that is not half of a pair decodes to a lone
# surrogate: not a character, and not encodable as UTF-8 (nor sendable to the API).
_SURROGATE = re.compile("[\ud800-\udfff]")


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise _Problem("text contains a NUL character")
    if not text.strip():
        raise _Problem("text is empty or whitespace only")
    if not text.isascii() and (m := _SURROGATE.search(text)):
        raise _Problem(f"text contains a lone surrogate escape (\\u{ord(m.group()):04x})")


def _check_meta(meta: dict[str, Any]) -> None:
    """The extra keys must be storable as standard UTF-8 JSON (and copied to the manifest)."""
    try:
        orjson.dumps(meta)
    except orjson.JSONEncodeError as exc:
        reason = str(exc)
        if "surrogate" in reason:
            raise _Problem("a key other than id and text holds a lone surrogate escape") from None
        if "ecursion" in reason:
            raise _Problem("the extra keys are nested too deep (more than 254 levels)") from None
        raise _Problem(f"the extra keys cannot be stored as JSON: {reason}") from None


def _record_from_object(obj: Any, default_id: str) -> tuple[str, str, dict[str, Any] | None]:
    """Validate one decoded JSON value; returns (id, text, meta) or raises _Problem."""
    if not isinstance(obj, dict):
        raise _Problem(f"expected a JSON object, found {_json_type(obj)}")
    raw_id = obj.get("id", default_id)
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int):
        raise _Problem(f"id must be a string or an integer, found {_json_type(raw_id)}")
    rec_id = str(raw_id)
    if rec_id == "":
        raise _Problem("id is empty")
    if not rec_id.isascii() and _SURROGATE.search(rec_id):
        raise _Problem("id contains a lone surrogate escape")
    if "text" not in obj:
        raise _Problem('the object has no "text" key')
    text = obj["text"]
    if not isinstance(text, str):
        raise _Problem(f"text must be a string, found {_json_type(text)}")
    _check_text(text)
    meta = {k: v for k, v in obj.items() if k not in ("id", "text")} or None
    if meta is not None:
        _check_meta(meta)
    return rec_id, text, meta


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


class _Collector:
    """Gathers records and per-record problems, detecting duplicate ids."""

    def __init__(self, name: str, unit: str) -> None:
        self.name = name
        self.unit = unit  # "line" or "item"
        self.records: list[Record] = []
        self.count = 0
        self.problems: list[dict[str, Any]] = []
        self.problem_count = 0
        self.seen: dict[str, int] = {}

    def problem(self, where: int, rec_id: str | None, error: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append({"id": rec_id, self.unit: where, "error": error})

    def add(self, where: int, obj: Any, line: int | None) -> None:
        record = self.check(where, obj, line)
        if record is not None:
            self.records.append(record)

    def check(self, where: int, obj: Any, line: int | None) -> Record | None:
        """The record `obj` makes, or None after noting its problem."""
        try:
            rec_id, text, meta = _record_from_object(obj, str(where))
        except _Problem as exc:
            rec_id_guess = obj.get("id") if isinstance(obj, dict) else None
            shown = rec_id_guess if isinstance(rec_id_guess, str) else None
            if shown is not None and not shown.isascii() and _SURROGATE.search(shown):
                shown = shown.encode("utf-8", "backslashreplace").decode("ascii")
            self.problem(where, shown, str(exc))
            return None
        first = self.seen.get(rec_id)
        if first is not None:
            self.problem(
                where, rec_id, f"duplicate id {rec_id!r} ({self.unit}s {first} and {where})"
            )
            return None
        self.seen[rec_id] = where
        self.count += 1
        return Record(rec_id, text, meta, line)

    def finish(self) -> None:
        """Raise `InputRejected` if any record had a problem or there were none."""
        if self.problems:
            first = self.problems[0]
            more = self.problem_count - 1
            tail = f" (and {more} more problem{'s' if more != 1 else ''})" if more else ""
            raise InputRejected(
                f"{self.name} {self.unit} {first[self.unit]}: {first['error']}{tail}.",
                records=self.problems,
            )
        if not self.count:
            raise InputRejected(f"{self.name} has no records.")

    def result(self) -> list[Record]:
        self.finish()
        return self.records


def _jsonl_lines(name: str, data: bytes) -> Iterator[str]:
    """The lines of a JSON Lines file, each decoded on its own: the file is never one
    big string (nor a list of all its lines) in memory. Split on b"\\n" only:
    str.splitlines() would also break on U+2028 and friends, legal inside JSON strings."""
    skip = len(BOM) if data.startswith(BOM) else 0
    nul = data.find(b"\x00", skip)
    if nul >= 0:
        raise InputRejected(f"{name} contains a NUL byte at byte offset {nul}.")
    start = skip
    while start <= len(data):
        end = data.find(b"\n", start)
        if end < 0:
            end = len(data)
        try:
            yield data[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputRejected(
                f"{name} is not valid UTF-8: byte offset {start + exc.start} ({exc.reason})."
            ) from None
        start = end + 1


def _iter_jsonl(name: str, data: bytes) -> Iterator[Record]:
    out = _Collector(name, "line")
    for number, line in enumerate(_jsonl_lines(name, data), start=1):
        if not line.strip(" \t\r"):
            continue
        try:
            obj = _loads(line)
        except json.JSONDecodeError as exc:
            out.problem(number, None, f"malformed JSON: {exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            out.problem(number, None, "JSON nested too deep to read")
            continue
        except ValueError as exc:
            out.problem(number, None, f"malformed JSON: {exc}")
            continue
        record = out.check(number, obj, number)
        if record is not None and not out.problem_count:
            yield record  # after a problem the file fails: its records are only checked
    out.finish()


def _parse_json(name: str, text: str) -> list[Record]:
    try:
        doc = _loads(text)
    except json.JSONDecodeError as exc:
        raise InputRejected(
            f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    except RecursionError:
        raise InputRejected(f"{name} is JSON nested too deep to read.") from None
    except ValueError as exc:
        raise InputRejected(f"{name} is not valid JSON: {exc}.") from None
    if not isinstance(doc, list):
        raise InputRejected(f"{name} must hold a JSON array of objects, found {_json_type(doc)}.")
    out = _Collector(name, "item")
    for index, obj in enumerate(doc, start=1):
        out.add(index, obj, None)
    return out.result()


def _parse_text(name: str, text: str) -> list[Record]:
    try:
        _check_text(text)
    except _Problem as exc:
        raise InputRejected(f"{name}: {exc}.", records=[{"id": name, "error": str(exc)}]) from None
    return [Record(name, text, None, None)]


def parse_document(name: str, data: bytes) -> list[Record]:
    """Parse the bytes of input file `name` into records, or raise `InputRejected`.

    `name` only chooses the format and appears in messages; it is not opened.
    """
    return list(iter_document(name, data))


def iter_document(name: str, data: bytes) -> Iterator[Record]:
    """The records of input file `name` one by one, as `parse_document` would list
    them; `InputRejected` is raised when the problem is met (a JSON Lines file's
    per-record problems all together, at its end). JSON Lines is read line by line,
    so its records need not all be in memory at once; the other formats are whole."""
    lowered = name.lower()
    if lowered.endswith(".jsonl"):
        yield from _iter_jsonl(name, data)
        return
    text = _decode(name, data)
    if lowered.endswith(".json"):
        yield from _parse_json(name, text)
        return
    yield from _parse_text(name, text)
