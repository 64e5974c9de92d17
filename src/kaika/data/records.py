"""Load and validate instruction data; split it deterministically.

An Alpaca record becomes ``{"instruction": str, "input": str, "output": str}``; a conversation
(``messages`` or ShareGPT ``conversations``) becomes ``{"messages": [...], "where": ...}``
(:mod:`kaika.data.conversations`); files of one run may mix both. All problems in
all files are collected before anything else happens (no model is loaded, nothing written),
and reported with the file, the line (JSONL, JSON) or record index (datasets) and the field.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from kaika.data.conversations import CONVERSATION_COLUMNS, LIST_KEYS, normalise_conversation, turns_key
from kaika.data.problems import LONE_SURROGATE, DataError, Problem
from kaika.errors import KaikaError

FIELDS = ("instruction", "input", "output")
REQUIRED = ("instruction", "output")
# Data that ships inside the package, by name (files under kaika/assets, provenance beside them).
BUILTIN_DATA = {
    "seed-tasks-ja": "seed_tasks_ja.jsonl",  # 175 Japanese Alpaca seed tasks, Apache-2.0
    "seed-chats-ja": "conversations/seed_chats_ja.jsonl",  # 87 conversations built from them, Apache-2.0
    "seed-prefs-ja": "preferences/seed_prefs_ja.jsonl",  # 154 preference pairs built from them, Apache-2.0
    "seed-kto-ja": "preferences/seed_kto_ja.jsonl",  # one side of each of those pairs, labelled, Apache-2.0
    "elyza-tasks-100": "elyza_tasks_100/elyza_tasks_100.jsonl",  # evaluation only, CC BY-SA 4.0
}
T = TypeVar("T")
log = logging.getLogger(__name__)
NESTING = "JSON nested deeper than the reader goes (about 1,000 levels of [ and {); records are flat objects"


def text_problem(value: Any, field: str | None = None) -> tuple[str | None, str] | None:
    """(field, why) for the first string of a parsed JSON value, keys included, that is not valid
    Unicode: a lone surrogate, which a ``\\ud800`` escape in JSON decodes to. No tokenizer, file or
    server can take it; every reader refuses it here, naming the record and field."""
    if isinstance(value, str):
        bad = LONE_SURROGATE.search(value)
        if bad:
            return field, (
                f"not valid Unicode: a lone surrogate \\u{ord(bad.group()):04x} at character {bad.start() + 1} "
                "(half of a \\u escape pair); fix or remove it"
            )
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = text_problem(key, field) if isinstance(key, str) else None
            found = found or text_problem(item, key if field is None else f"{field}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = text_problem(item, f"{field or 'record'}[{i}]")
            if found:
                return found
    return None


class _Object(dict):
    """A JSON object that remembers the keys it held twice (JSON's reader keeps the last silently)."""

    duplicates: list[str]


def _object(pairs: list[tuple[str, Any]]) -> dict:
    obj = _Object(pairs)
    obj.duplicates = [k for k in dict.fromkeys(k for k, _ in pairs) if sum(1 for p, _ in pairs if p == k) > 1]
    return obj


def _loads(text: str) -> Any:
    return json.loads(text, object_pairs_hook=_object)


def duplicate_keys(value: Any) -> list[str]:
    """Keys that an object of ``value`` (a record as read) held twice, nested objects included."""
    found = list(getattr(value, "duplicates", []))
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    for item in items:
        found += duplicate_keys(item)
    return found


def _iter_jsonl(path: Path, raw: bytes, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    if b"\r" in raw and b"\n" not in raw.strip():
        problems.append(
            Problem(str(path), "file", None, "its lines end with a carriage return alone (\\r, old Mac line "
                    "endings), which JSON Lines does not read as line breaks; re-save it with \\n line endings")
        )  # fmt: skip
        return
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                Problem(
                    str(path),
                    f"line {lineno}",
                    None,
                    f"invalid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                    "re-save the file as UTF-8",
                )
            )
            continue
        if not text.strip():
            continue
        try:
            record = _loads(text)
        except json.JSONDecodeError as e:
            problems.append(
                Problem(str(path), f"line {lineno}", None, f"malformed JSON at column {e.colno}: {e.msg}")
            )
            continue
        except RecursionError:
            problems.append(Problem(str(path), f"line {lineno}", None, NESTING))
            continue
        yield f"line {lineno}", record


def _iter_json(path: Path, raw: bytes, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        problems.append(
            Problem(
                str(path),
                f"line {line}",
                None,
                f"invalid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8",
            )
        )
        return
    try:
        data = _loads(text)
    except json.JSONDecodeError as e:
        problems.append(
            Problem(str(path), f"line {e.lineno}", None, f"malformed JSON at column {e.colno}: {e.msg}")
        )
        return
    except RecursionError:
        problems.append(Problem(str(path), "file", None, NESTING))
        return
    if isinstance(data, dict) and isinstance(data.get("data"), list):  # {"data": [...]} is common too
        for i, rec in enumerate(data["data"]):
            yield f"record {i}", rec
        return
    if not isinstance(data, list):
        problems.append(
            Problem(str(path), "line 1", None, "expected a JSON array of records (or JSON Lines)")
        )
        return
    # Walk the records once more to name the line each starts on (counted incrementally: linear time).
    decoder, pos, line = json.JSONDecoder(), text.index("[") + 1, 1
    line += text.count("\n", 0, pos)
    for i, rec in enumerate(data):
        start = pos
        while text[pos] in " \t\r\n,":
            pos += 1
        line += text.count("\n", start, pos)
        yield f"line {line} (record {i})", rec
        end = decoder.raw_decode(text, pos)[1]
        line += text.count("\n", pos, end)
        pos = end


def _iter_dataset(source: str, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    import datasets  # heavy: import only when a dataset is asked for

    path = Path(source)
    try:
        if path.is_dir() and _is_saved_dataset(path):
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(source, split="train")
    except Exception as e:  # the library raises many types; the user needs the reason, not the trace
        problems.append(Problem(source, "dataset", None, f"could not load: {type(e).__name__}: {e}"))
        return
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            problems.append(Problem(source, "dataset", None, f"no 'train' split (has {', '.join(ds)})"))
            return
        ds = ds["train"]
    for i, rec in enumerate(ds):
        yield f"record {i}", rec


def _one_json_value(raw: bytes) -> bool:
    """Whether ``raw`` holds one JSON value (else, typically, JSON Lines)."""
    try:
        json.loads(raw)
    except json.JSONDecodeError as e:
        return e.msg != "Extra data"  # a later value after the first: JSON Lines
    except (UnicodeDecodeError, RecursionError):
        return True  # reported by the JSON reader with its position
    return True


# Files in a data directory that document it rather than hold records: skipped, and said so.
DOC_FILES = re.compile(
    r"^(README|LICEN[CS]E|COPYING|NOTICE|PROVENANCE|CHANGELOG)([._-].*)?$|\.md$", re.IGNORECASE
)
JSON_SUFFIXES = (".json", ".jsonl")


def _is_saved_dataset(directory: Path) -> bool:
    return (directory / "dataset_info.json").exists() or (directory / "state.json").exists()


def _data_files(directory: Path, problems: list[Problem]) -> list[Path] | None:
    """The JSON/JSONL files of a data directory (not a saved dataset), every one of them; None when
    the directory holds no JSON (another format: the datasets library reads it). A directory that mixes
    JSON with files of other kinds is refused naming them: no file of it is left unread in silence."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(directory).parts))  # fmt: skip
    docs = [p for p in files if DOC_FILES.search(p.name)]
    data = [p for p in files if p not in docs]
    json_files = [p for p in data if p.suffix in JSON_SUFFIXES]
    if not json_files:
        kinds = sorted({p.suffix or "(no suffix)" for p in data})
        if len(kinds) > 1:  # the datasets library would read the commonest kind and leave the rest
            problems.append(
                Problem(str(directory), "directory", None,
                        f"holds files of several kinds ({', '.join(kinds)}); one kind of data file per directory")
            )  # fmt: skip
            return []
        return None
    others = [p for p in data if p.suffix not in JSON_SUFFIXES]
    if others:
        names = ", ".join(str(p.relative_to(directory)) for p in others[:8]) + (
            " …" if len(others) > 8 else ""
        )
        problems.append(
            Problem(
                str(directory),
                "directory",
                None,
                f"holds JSON/JSONL data and {len(others)} file(s) kaika would not read as data: {names}. "
                "Move them out, or give the data files themselves",
            )
        )
        return []
    if docs:
        log.info("%s: not data, skipped: %s", directory, ", ".join(p.name for p in docs))
    return json_files


def iter_source(source: str, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    """``(where, raw record)`` of one source, read but not validated as records; read errors, and
    records holding text that is not valid Unicode, are appended to ``problems`` instead.

    The one reader of JSON, JSONL and dataset sources: training data, prompts, evaluation tasks,
    pretraining text, and the tools that look at records as they are (data check, translate).
    A name of :data:`BUILTIN_DATA` reads the file shipped with kaika.
    """
    for where, rec in _iter_source(source, problems):
        bad = text_problem(rec)
        if bad is not None:
            problems.append(Problem(source, where, bad[0], bad[1]))
            continue
        twice = duplicate_keys(rec)
        if twice:
            problems.append(Problem(source, where, twice[0], "appears twice in the record (JSON would keep the last "
                                    "in silence); keep one"))  # fmt: skip
            continue
        yield where, rec


def _iter_source(source: str, problems: list[Problem]) -> Iterator[tuple[str, Any]]:
    path = builtin_data_path(source) or Path(source)
    if path.is_file():
        try:
            raw = path.read_bytes()
        except OSError as e:
            problems.append(Problem(source, "file", None, f"cannot read: {e.strerror}"))
            return
        raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark (Excel, Notepad): not data
        if not raw.strip():
            problems.append(Problem(source, "file", None, "the file is empty"))
            return
        # A JSON array, or JSON Lines, told apart by content: datasets' to_json() writes JSON Lines
        # into files named .json, and a .json of one record per line is common.
        is_array = raw.lstrip()[:1] == b"[" or (path.suffix == ".json" and _one_json_value(raw))
        yield from (_iter_json if is_array else _iter_jsonl)(path, raw, problems)
        return
    files = _data_files(path, problems) if path.is_dir() and not _is_saved_dataset(path) else None
    if files is not None:
        # A directory of JSON/JSONL files: each read as a file, so a problem names its file and line.
        for file in files:
            rel = file.relative_to(path)
            for where, rec in _iter_source(str(file), problems):
                yield f"{rel} {where}", rec
    elif path.is_dir() or ("/" in source and path.suffix not in JSON_SUFFIXES and not path.exists()):
        yield from _iter_dataset(source, problems)
    else:
        problems.append(
            Problem(
                source,
                "file",
                None,
                "not found (give a JSON/JSONL file, a dataset dir, a hub name or a builtin: "
                f"{', '.join(BUILTIN_DATA)})",
            )
        )


def builtin_data_path(name: str, table: dict[str, str] = BUILTIN_DATA) -> Path | None:
    """The shipped file of builtin data ``name`` (unless a file of that name is right here)."""
    if name not in table or Path(name).exists():
        return None
    from importlib import resources

    return Path(str(resources.files("kaika.assets").joinpath(table[name])))


def normalise_record(
    rec: Any,
    columns: dict[str, str],
    source: str,
    where: str,
    problems: list[Problem],
    required: tuple[str, ...] = REQUIRED,
    conversations: bool = False,
    columns_option: bool = True,
) -> dict[str, str] | None:
    """The record as ``{instruction, input, output}`` (or, with ``conversations``, a conversation
    record when it is one), or None after adding its problems."""
    if not isinstance(rec, dict):
        problems.append(Problem(source, where, None, f"expected a JSON object, got {type(rec).__name__}"))
        return None
    if conversations:
        key = turns_key(rec, columns)
        if key is not None:
            forms = [k for k in LIST_KEYS if k in rec] + [
                columns.get(f, f) for f in FIELDS if f != "input" and columns.get(f, f) in rec
            ]
            if len(forms) > 1:  # which one to train is the user's choice, not kaika's
                problems.append(
                    Problem(
                        source,
                        where,
                        None,
                        f"holds several forms of one example ({', '.join(forms)}); keep one",
                    )
                )
                return None
            return normalise_conversation(rec, key, columns, source, where, problems)
    out: dict[str, str] = {}
    ok = True
    for fld in FIELDS:
        key = columns.get(fld, fld)
        label = fld if key == fld else f"{key} (as {fld})"
        value = rec.get(key)
        if value is None and fld not in required:
            value = ""
        if value is None:
            problems.append(
                Problem(
                    source,
                    where,
                    label,
                    "missing"
                    + (
                        f"; the record has keys {', '.join(map(str, rec))}"
                        + (" — map them with --columns" if columns_option else "")
                        if key not in rec
                        else ""
                    ),
                )
            )
            ok = False
        elif not isinstance(value, str):
            problems.append(Problem(source, where, label, f"expected a string, got {type(value).__name__}"))
            ok = False
        elif fld in required and not value.strip():
            problems.append(Problem(source, where, label, "empty"))
            ok = False
        else:
            out[fld] = value
    return out if ok else None


# A record longer than cutoff_len × this many characters is left out before it is tokenized: cut to
# cutoff_len it would keep under 1/64 of its text, and tokenizing it whole costs more memory than the
# rest of a run (a 10 MB record: hundreds of MB of ids and offsets). No common tokenizer averages
# near 64 characters a token on real text (Japanese: about 1-2; English: about 4).
CHARS_PER_TOKEN_CAP = 64


def record_chars(rec: dict) -> int:
    """The characters of a record's text: Alpaca's three fields, a conversation's turns, a pair's sides,
    a KTO record's answer."""
    chars = sum(
        len(rec.get(k) or "") for k in ("instruction", "input", "output") if isinstance(rec.get(k), str)
    )
    for key in ("messages", "chosen", "rejected", "completion"):
        value = rec.get(key)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            chars += sum(len(m.get("content") or "") for m in value if isinstance(m, dict))
    return chars


def over_char_cap(rec: dict, cutoff_len: int) -> bool:
    return record_chars(rec) > cutoff_len * CHARS_PER_TOKEN_CAP


def warn_left_out(where: str, chars: int, cutoff_len: int) -> None:
    log.warning(
        "%s: %s characters, over cutoff_len %d × %d: left out before tokenizing (cut to cutoff_len it "
        "would keep under 1/%d of its text); split it, or raise --cutoff-len",
        where, f"{chars:,}", cutoff_len, CHARS_PER_TOKEN_CAP, CHARS_PER_TOKEN_CAP,
    )  # fmt: skip


def load_records(sources: Iterable[str], columns: dict[str, str] | None = None) -> list[dict[str, str]]:
    """All records of all sources (Alpaca and conversations), validated; raises DataError listing
    every problem."""
    columns = columns or {}
    targets = (*FIELDS, *CONVERSATION_COLUMNS)
    bad_cols = sorted(set(columns) - set(targets))
    if bad_cols:
        raise KaikaError(f"columns: unknown target field(s) {', '.join(bad_cols)}; use {', '.join(targets)}")
    sources = list(sources)
    if not sources:
        raise KaikaError("no training data given: pass --data FILE (Alpaca or conversations, JSON or JSONL)")
    problems: list[Problem] = []
    records: list[dict[str, str]] = []
    optional_keys = {columns.get(f, f) for f in FIELDS if f not in REQUIRED}
    for source in sources:
        before, first = len(records) + len(problems), len(records)
        seen_keys: set[str] = set()
        for where, rec in iter_source(source, problems):
            if isinstance(rec, dict):
                seen_keys |= optional_keys & set(rec)
            norm = normalise_record(rec, columns, source, where, problems, conversations=True)
            if norm is not None:
                records.append(norm)
        if len(records) + len(problems) == before:
            problems.append(Problem(source, "file", None, "contains no records"))
        # An optional column the user mapped but no record has is a typo, not "no inputs".
        alpaca = any("messages" not in r for r in records[first:])
        for fld, key in columns.items():
            if fld in FIELDS and fld not in REQUIRED and key != fld and key not in seen_keys and alpaca:
                problems.append(
                    Problem(source, "every record", f"{key} (as {fld})", "the mapped column is absent")
                )
    if problems:
        raise DataError(problems)
    return records


def load_prompts(source: str) -> list[dict[str, str]]:
    """Records to answer: like ``load_records`` but ``output`` is not needed (and ignored)."""
    problems: list[Problem] = []
    records = []
    for where, rec in iter_source(source, problems):
        norm = normalise_record(
            rec, {}, source, where, problems, required=("instruction",), columns_option=False
        )
        if norm is not None:
            records.append({"instruction": norm["instruction"], "input": norm["input"]})
    if problems:
        raise DataError(problems)
    return records


def split_records(
    records: list[T], val_set_size: float, seed: int, what: str = "validation records"
) -> tuple[list[T], list[T]]:
    """Deterministic train/validation split: the same records, size and seed give the same split.

    ``val_set_size`` is a count (>= 1) or a fraction (< 1); the held-out part keeps the input order.
    """
    if val_set_size <= 0:
        return records, []
    n_val = int(val_set_size) if val_set_size >= 1 else round(val_set_size * len(records))
    if not 0 < n_val < len(records):
        raise KaikaError(
            f"val_set_size {val_set_size:g} gives {n_val} {what} out of {len(records)}; "
            "choose a count between 1 and their number minus one, or a fraction"
        )
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)])
