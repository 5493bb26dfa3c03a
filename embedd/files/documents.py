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

import codecs
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import numpy.typing as npt
import orjson

from embedd.errors import InputRejected

BOM = b"\xef\xbb\xbf"
MAX_REPORTED = 1000  # per-record problems listed in error.json; the rest are counted
READ_BYTES = 1 << 20  # an input is read (and a .json array decoded) this much at a time

Source = bytes | IO[bytes]


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


# Strict JSON: no NaN/Infinity, no repeated keys. One decoder for every line (json.loads
# with these arguments would build a new one each call).
_DECODER = json.JSONDecoder(parse_constant=_reject_constant, object_pairs_hook=_unique_keys)


def _loads(text: str) -> Any:
    """Strict json.loads: no NaN/Infinity, no repeated keys."""
    if text.startswith("\ufeff"):  # as json.loads says it
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return _DECODER.decode(text)


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


class _SeenIds:
    """The ids met so far in one file, in 8 bytes each (a file of millions of short
    records must not keep millions of id strings): a 64-bit hash of each id, the
    older ones in a sorted numpy array, the newest in a small set merged into it.
    A hit is only a suspect: two ids can share a hash; `_Collector` confirms exactly."""

    MERGE_AT = 1 << 16

    def __init__(self, bits: int = 64) -> None:
        self.mask = (1 << bits) - 1  # fewer bits: more hits (how tests make collisions)
        self.old: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self.new: set[int] = set()

    def add(self, rec_id: str) -> bool:
        """Note `rec_id`; True if its hash was met before (maybe the same id)."""
        key = hash(rec_id) & self.mask
        if key in self.new:
            return True
        if len(self.old):
            probe = np.uint64(key)
            i = int(np.searchsorted(self.old, probe))
            if i < len(self.old) and self.old[i] == probe:
                return True
        self.new.add(key)
        if len(self.new) >= self.MERGE_AT:
            fresh = np.fromiter(self.new, dtype=np.uint64, count=len(self.new))
            fresh.sort()
            merged = np.concatenate((self.old, fresh))
            del fresh
            merged.sort(kind="stable")  # two sorted runs: a merge, not a full sort
            self.old = merged
            self.new = set()
        return False


# (where, id) of every valid record of the file, read again from its start: how a
# suspected duplicate is confirmed.
Rescan = Callable[[], Iterator[tuple[int, str]]]


class _Collector:
    """Gathers per-record problems and counts records, detecting duplicate ids."""

    def __init__(self, name: str, unit: str, rescan: Rescan | None = None) -> None:
        self.name = name
        self.unit = unit  # "line" or "item"
        self.records: list[Record] = []
        self.count = 0
        self.problems: list[dict[str, Any]] = []
        self.problem_count = 0
        self.seen = _SeenIds()
        self.suspects: list[tuple[str, int]] = []
        self.rescan = rescan

    def problem(self, where: int, rec_id: str | None, error: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_REPORTED:
            self.problems.append({"id": rec_id, self.unit: where, "error": error})

    def add(self, where: int, obj: Any, line: int | None) -> None:
        record = self.check(where, obj, line)
        if record is not None:
            self.records.append(record)

    def check(self, where: int, obj: Any, line: int | None) -> Record | None:
        """The record `obj` makes, or None after noting its problem. A record whose id
        may repeat an earlier one is returned too; `finish` confirms it and fails the file."""
        try:
            rec_id, text, meta = _record_from_object(obj, str(where))
        except _Problem as exc:
            rec_id_guess = obj.get("id") if isinstance(obj, dict) else None
            shown = rec_id_guess if isinstance(rec_id_guess, str) else None
            if shown is not None and not shown.isascii() and _SURROGATE.search(shown):
                shown = shown.encode("utf-8", "backslashreplace").decode("ascii")
            self.problem(where, shown, str(exc))
            return None
        if self.seen.add(rec_id):
            self.suspects.append((rec_id, where))
        self.count += 1
        return Record(rec_id, text, meta, line)

    def _confirm(self) -> None:
        """Suspected duplicates, checked against the file read again: each id's first
        record; a later one with the same id is a problem (in file order with the rest)."""
        if not self.suspects:
            return
        wanted = {rec_id for rec_id, _ in self.suspects}
        first: dict[str, int] = {}
        if self.rescan is None:  # records kept in memory
            pairs: Iterator[tuple[int, str]] = ((r.line or 0, r.id) for r in self.records)
        else:
            pairs = self.rescan()
        for where, rec_id in pairs:
            if rec_id in wanted and rec_id not in first:
                first[rec_id] = where
        problems, count = self.problems, self.problem_count
        self.problems = []
        duplicates = [
            (where, rec_id, first[rec_id])
            for rec_id, where in self.suspects
            if first.get(rec_id, where) < where
        ]
        merged = sorted(
            [(p[self.unit], 0, p) for p in problems]
            + [(where, 1, {"id": rec_id, "first": f}) for where, rec_id, f in duplicates],
            key=lambda item: item[:2],
        )
        for where, kind, p in merged:
            if kind == 0:
                self.problem(where, p["id"], p["error"])
            else:
                f = p["first"]
                error = f"duplicate id {p['id']!r} ({self.unit}s {f} and {where})"
                self.problem(where, p["id"], error)
        self.problem_count = count + len(duplicates)
        self.count -= len(duplicates)
        self.suspects = []

    def finish(self) -> None:
        """Raise `InputRejected` if any record had a problem or there were none."""
        self._confirm()
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


def prescan(name: str, f: IO[bytes], *, utf8: bool) -> int:
    """Check the whole file a piece at a time before parsing it, as reading it whole
    did: a NUL byte anywhere is reported first, then (with `utf8`) the first invalid
    UTF-8 byte. Returns the length of a leading BOM (where parsing starts)."""
    f.seek(0)
    skip = len(BOM) if f.read(len(BOM)) == BOM else 0
    f.seek(skip)
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    bad: str | None = None
    offset = skip
    while True:
        chunk = f.read(READ_BYTES)
        final = not chunk
        nul = chunk.find(b"\x00")
        if nul >= 0:
            raise InputRejected(f"{name} contains a NUL byte at byte offset {offset + nul}.")
        if utf8 and bad is None:
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk, final)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                bad = f"{name} is not valid UTF-8: byte offset {at} ({exc.reason})."
        if final:
            break
        offset += len(chunk)
    if bad is not None:
        raise InputRejected(bad)
    f.seek(skip)
    return skip


def _jsonl_lines(name: str, f: IO[bytes]) -> Iterator[str]:
    """The lines of a JSON Lines file, each read and decoded on its own: the file is
    never one big string (nor whole bytes) in memory. Split on b"\\n" only:
    str.splitlines() would also break on U+2028 and friends, legal inside JSON strings."""
    start = prescan(name, f, utf8=False)
    for raw in f:
        body = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            yield body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputRejected(
                f"{name} is not valid UTF-8: byte offset {start + exc.start} ({exc.reason})."
            ) from None
        start += len(raw)


def _jsonl_values(name: str, f: IO[bytes]) -> Iterator[tuple[int, Any, str | None]]:
    """(line number, decoded value, None) or (line number, None, problem) a line at a
    time; blank lines are skipped."""
    for number, line in enumerate(_jsonl_lines(name, f), start=1):
        if not line.strip(" \t\r"):
            continue
        try:
            yield number, _loads(line), None
        except json.JSONDecodeError as exc:
            yield number, None, f"malformed JSON: {exc.msg} at column {exc.colno}"
        except RecursionError:
            yield number, None, "JSON nested too deep to read"
        except ValueError as exc:
            yield number, None, f"malformed JSON: {exc}"


def _valid_ids(values: Iterator[tuple[int, Any, str | None]]) -> Iterator[tuple[int, str]]:
    """(where, id) of the values that make a valid record."""
    for where, obj, error in values:
        if error is None:
            try:
                rec_id, _, _ = _record_from_object(obj, str(where))
            except _Problem:
                continue
            yield where, rec_id


def _iter_jsonl(name: str, f: IO[bytes]) -> Iterator[Record]:
    out = _Collector(name, "line", lambda: _valid_ids(_jsonl_values(name, f)))
    for number, obj, error in _jsonl_values(name, f):
        if error is not None:
            out.problem(number, None, error)
            continue
        record = out.check(number, obj, number)
        if record is not None and not out.problem_count:
            yield record  # after a problem the file fails: its records are only checked
    out.finish()


_WHITESPACE = " \t\n\r"


class _Window:
    """A sliding window over the decoded text of a file: text already parsed is
    dropped when more is read, and its lines are counted so positions stay those of
    the whole document (as `json.loads` of the whole file would report them)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self.buf = ""
        self.pos = 0
        self.eof = False
        self.lines = 0  # newlines in the dropped text
        self.column = 0  # characters after the last newline in the dropped text

    def more(self, want: int = READ_BYTES) -> bool:
        """Drop the parsed text and read at least one more character; False at the end."""
        if self.pos:
            newlines = self.buf.count("\n", 0, self.pos)
            if newlines:
                self.lines += newlines
                self.column = self.pos - self.buf.rfind("\n", 0, self.pos) - 1
            else:
                self.column += self.pos
            self.buf = self.buf[self.pos :]
            self.pos = 0
        while not self.eof:
            raw = self.f.read(want)
            self.eof = not raw
            text = self.decoder.decode(raw, self.eof)
            if text:
                self.buf += text
                return True
        return False

    def peek(self) -> str:
        """The next character that is not JSON whitespace, "" at the end."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def value(self) -> Any:
        """The JSON value at the position; read more while it may be cut off."""
        while True:
            try:
                obj, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.buf) - 64 or exc.msg.startswith("Unterminated")
                offset = exc.pos - self.pos  # reading more drops the text before pos
                if cut and self.more(max(READ_BYTES, len(self.buf) - self.pos)):
                    continue
                raise self.error(exc.msg, self.pos + offset) from None
            length = end - self.pos  # reading more drops the text before pos
            if end >= len(self.buf) and self.more():  # a number or literal may go on
                continue
            self.pos += length
            return obj

    def error(self, msg: str, pos: int) -> json.JSONDecodeError:
        """`msg` at `pos` of the window, with the line and column in the whole text."""
        exc = json.JSONDecodeError(msg, self.buf, pos)
        newlines = self.buf.count("\n", 0, pos)
        exc.lineno = self.lines + newlines + 1
        exc.colno = pos - self.buf.rfind("\n", 0, pos) if newlines else self.column + pos + 1
        return exc


def _json_items(name: str, f: IO[bytes], skip: int) -> Iterator[tuple[int, Any]]:
    """(position, value) of each item of the JSON array in `f` (from byte `skip`),
    decoded a window at a time; the array is never whole in memory."""
    text = _Window(f)
    try:
        if text.peek() != "[":  # not an array: read whole, as before, for the message
            f.seek(skip)
            doc = _loads(f.read().decode("utf-8"))
            raise InputRejected(
                f"{name} must hold a JSON array of objects, found {_json_type(doc)}."
            )
        text.pos += 1
        index = 0
        if text.peek() == "]":
            text.pos += 1
        else:
            while True:
                text.peek()
                obj = text.value()
                index += 1
                yield index, obj
                del obj
                sep = text.peek()
                text.pos += 1
                if sep == "]":
                    break
                if sep != ",":
                    raise text.error("Expecting ',' delimiter", text.pos - 1)
        if text.peek():
            raise text.error("Extra data", text.pos)
    except json.JSONDecodeError as exc:
        raise InputRejected(
            f"{name} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None
    except RecursionError:
        raise InputRejected(f"{name} is JSON nested too deep to read.") from None
    except ValueError as exc:
        raise InputRejected(f"{name} is not valid JSON: {exc}.") from None


def _iter_json(name: str, f: IO[bytes]) -> Iterator[Record]:
    skip = prescan(name, f, utf8=True)

    def rescan() -> Iterator[tuple[int, str]]:
        f.seek(skip)
        return _valid_ids((where, obj, None) for where, obj in _json_items(name, f, skip))

    out = _Collector(name, "item", rescan)
    for index, obj in _json_items(name, f, skip):
        record = out.check(index, obj, None)
        if record is not None and not out.problem_count:
            yield record  # after a problem the file fails: its records are only checked
    out.finish()


def _parse_text(name: str, text: str) -> list[Record]:
    try:
        _check_text(text)
    except _Problem as exc:
        raise InputRejected(f"{name}: {exc}.", records=[{"id": name, "error": str(exc)}]) from None
    return [Record(name, text, None, None)]


def parse_document(name: str, data: Source) -> list[Record]:
    """Parse input file `name` (its bytes, or the file open for binary reading) into
    records, or raise `InputRejected`.

    `name` only chooses the format and appears in messages; it is not opened.
    """
    return list(iter_document(name, data))


def iter_document(name: str, data: Source) -> Iterator[Record]:
    """The records of input file `name` one by one, as `parse_document` would list
    them; `InputRejected` is raised when the problem is met (per-record problems all
    together, at the end). `data` is the file's bytes or the file itself, open for
    binary reading and seekable: JSON Lines is read a line at a time and a `.json`
    array an item at a time, so neither the file nor its records are ever whole in
    memory (a duplicate id is confirmed by reading the file again); a text file is
    one record, read whole."""
    f: IO[bytes] = io.BytesIO(data) if isinstance(data, bytes) else data
    lowered = name.lower()
    if lowered.endswith(".jsonl"):
        yield from _iter_jsonl(name, f)
        return
    if lowered.endswith(".json"):
        yield from _iter_json(name, f)
        return
    f.seek(0)
    yield from _parse_text(name, _decode(name, f.read()))
