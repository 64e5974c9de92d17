"""``kaika translate``: Alpaca data into another language with DeepL, never paying twice, never losing work.

Read ``translate_file()`` top to bottom: read and check the input, choose the records, skip the
ones the output already holds, then translate batch by batch. Each batch goes through the
SQLite cache first (only misses are sent), its translations are committed to the cache as
soon as DeepL answers, and its records are appended to the output and flushed. A run stopped
at any point (kill, Ctrl-C, quota, network) therefore resumes where it stopped and re-sends
nothing DeepL has already answered.

What must not be translated (code blocks, inline code, URLs, e-mail addresses, placeholders,
markup) is wrapped in an ignore tag and sent with ``tag_handling="xml"``; on the way back each
wrapped span is replaced by its original, byte for byte, by its id. Fields without a letter
outside such spans (numbers-only answers, a bare code block) are copied, not sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import re
import sqlite3
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import escape, unescape
from pathlib import Path
from typing import Any, Literal

from kaika.config import Checked, check, option
from kaika.data.records import FIELDS, DataError, Problem, iter_source, normalise_record
from kaika.errors import KaikaError
from kaika.guard import check_output_file

log = logging.getLogger(__name__)

IGNORE_TAG = "kx"  # short: tag characters are not billed, but they count towards the request size
PROVENANCE_KEY = "_kaika"
# DeepL API Pro, usage part: EUR 0.00002 per source character, i.e. EUR 20 per million, plus a
# monthly base price (support.deepl.com, "Character count and billing in DeepL API", article
# 360020685720). Tag characters are not billed; text inside ignore tags is counted here anyway.
DEFAULT_PRICE_PER_MILLION = 20.0
MAX_TEXTS_PER_REQUEST = 50  # DeepL's limit for one /v2/translate request
MAX_REQUEST_BYTES = 100_000  # DeepL refuses bodies over 128 KiB; keep a margin for JSON and tags


Field = Literal["instruction", "input", "output"]
Formality = Literal["default", "more", "less", "prefer_more", "prefer_less"]


@dataclass
class TranslateArgs(Checked):
    """What to translate, how, and where to keep the results."""

    output: str | None = option(
        None, "Output JSONL (appended to; a rerun resumes). Default: INPUT's name + .TARGET.jsonl."
    )
    target_lang: str = option("JA", "Target language code (JA, EN-US, DE…).")
    source_lang: str | None = option(None, "Source language code (EN…); default: DeepL detects it.")
    fields: list[Field] = option(list(FIELDS), "Fields to translate; the others are copied unchanged.")
    columns: dict[str, str] = option(
        {}, "Column mapping for input whose keys differ, e.g. input=context output=response."
    )
    limit: int | None = option(None, "Translate only the first N records.", ge=1)
    sample: int | None = option(
        None, "Translate a random sample of N records (see --seed); output in input order."
    )
    seed: int = option(0, "Seed for --sample.", ge=0)
    auth_key: str | None = option(None, "DeepL auth key; default: $DEEPL_AUTH_KEY. A free key ends in :fx.")
    server_url: str | None = option(
        None, "A DeepL-compatible server; default: DeepL's free or pro API, chosen from the key."
    )
    formality: Formality | None = option(
        None, "DeepL formality: more, less, prefer_more, prefer_less, default."
    )
    glossary: str | None = option(
        None,
        "A DeepL glossary id, or a TSV/CSV file of 'source<TAB>target' terms (needs --source-lang; "
        "created on the server when first needed).",
    )
    cache: str | None = option(
        None, "SQLite translation cache; default: kaika's cache dir (shared by all runs: never pay twice)."
    )
    batch_size: int = option(25, "Texts per DeepL request (at most 50).", ge=1, le=MAX_TEXTS_PER_REQUEST)
    max_retries: int = option(
        5, "Retries on 429 / 5xx / network errors, done by the deepl client with backoff.", ge=0
    )
    dry_run: bool = option(False, "Count characters per field and estimate the cost; send nothing.")
    price_per_million: float = option(
        DEFAULT_PRICE_PER_MILLION,
        "Price per million source characters for --dry-run (DeepL API Pro: EUR 20).",
        ge=0,
    )


@dataclass
class TranslateResult:
    output: Path
    selected: int = 0  # records chosen by --limit / --sample (or all)
    already_done: int = 0  # found in the output at start
    written: int = 0  # records appended by this run
    texts_sent: int = 0
    characters_sent: int = 0
    cache_hits: int = 0
    copied_fields: int = 0  # numbers-only / code-only / empty fields, not sent
    lost_spans: int = 0  # protected spans DeepL dropped (restored at the end of the field)
    requests: int = 0
    characters: dict[str, int] = field(default_factory=dict)  # dry run: per field, to send
    cached_characters: int = 0  # dry run: characters already in the cache
    estimated_cost: float = 0.0
    price_per_million: float = 0.0
    dry_run: bool = False
    stopped: str | None = None  # why the run stopped early, if it did

    @property
    def done(self) -> int:
        return self.already_done + self.written


class TranslationStopped(KaikaError):
    """DeepL refused to go on (quota, key, network): the work so far is saved, a rerun resumes."""

    def __init__(self, reason: str, result: TranslateResult):
        self.result = result
        super().__init__(
            f"{reason}\nStopped after {result.done} of {result.selected} records "
            f"({result.written} this run); they are in {result.output}. Run the same command again "
            "to resume: nothing already translated will be sent again."
        )


# --------------------------------------------------------------------------- protection

# Order matters: a fenced block may contain inline code, URLs and braces.
PROTECTED_SPANS = re.compile(
    r"""
    (?P<fence>\n?(?P<f>```|~~~)[^\n]*\n.*?(?:(?P=f)[^\n]*|\Z)\n?)      # fenced code block (maybe unclosed)
    | (?P<inline>`[^`\n]+`)                                           # inline code
    | (?P<url>(?:https?|ftp)://[^\s<>"'`）」』】]+[^\s<>"'`）」』】.,;:!?。、)]) # URL, no trailing punctuation
    | (?P<email>[\w.+-]+@[\w-]+(?:\.[\w-]+)+)
    | (?P<placeholder>\{\{.*?\}\}|\{[\w.]*\}|%\(\w+\)[sdfir]|%[sdfi]|\$\{\w+\}|\[\[.*?\]\])
    | (?P<markup></?[A-Za-z][\w:-]*(?:\s[^<>]*)?/?>)                  # HTML/XML tags in the data
    """,
    re.S | re.X,
)
_WRAPPED = re.compile(rf'<{IGNORE_TAG} i="(\d+)"(?:/>|>(.*?)</{IGNORE_TAG}>)', re.S)


def protect(text: str) -> tuple[str, list[str]]:
    """``text`` as XML for DeepL with every protected span in an ignore tag, and the spans."""
    parts, spans, pos = [], [], 0
    for m in PROTECTED_SPANS.finditer(text):
        parts.append(escape(text[pos : m.start()], quote=False))
        parts.append(f'<{IGNORE_TAG} i="{len(spans)}">{escape(m.group(), quote=False)}</{IGNORE_TAG}>')
        spans.append(m.group())
        pos = m.end()
    parts.append(escape(text[pos:], quote=False))
    return "".join(parts), spans


def restore(xml: str, spans: list[str]) -> tuple[str, int]:
    """The translated text with each protected span put back exactly; and how many were lost.

    A span DeepL dropped is appended at the end (losing code silently is worse than a
    misplaced block); the count goes into the record's provenance.
    """
    seen: set[int] = set()
    out, pos = [], 0
    for m in _WRAPPED.finditer(xml):
        i = int(m.group(1))
        out.append(unescape(xml[pos : m.start()]))
        if i < len(spans) and i not in seen:
            out.append(spans[i])
            seen.add(i)
        pos = m.end()
    out.append(unescape(xml[pos:]))
    lost = [s for i, s in enumerate(spans) if i not in seen]
    return "".join(out) + "".join(lost), len(lost)


def needs_translation(text: str) -> bool:
    """Whether any letter is left outside protected spans (numbers, symbols, bare code: no)."""
    rest = PROTECTED_SPANS.sub(" ", text)
    return any(unicodedata.category(ch).startswith("L") for ch in rest)


# --------------------------------------------------------------------------- cache


class TranslationCache:
    """Every translation ever received, keyed by what was sent and how (SQLite, one file)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30)
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS translations (text_hash TEXT, source_lang TEXT, target_lang TEXT, "
            "options TEXT, glossary TEXT, translation TEXT NOT NULL, detected_lang TEXT, created TEXT, "
            "PRIMARY KEY (text_hash, source_lang, target_lang, options, glossary))"
        )
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS glossaries (entries_hash TEXT, server TEXT, glossary_id TEXT, "
            "PRIMARY KEY (entries_hash, server))"
        )
        self.db.commit()

    @staticmethod
    def text_hash(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def get(self, texts: list[str], ctx: tuple[str, str, str, str]) -> dict[str, tuple[str, str]]:
        found = {}
        for text in texts:
            row = self.db.execute(
                "SELECT translation, detected_lang FROM translations WHERE text_hash=? AND source_lang=? "
                "AND target_lang=? AND options=? AND glossary=?",
                (self.text_hash(text), *ctx),
            ).fetchone()
            if row:
                found[text] = (row[0], row[1] or "")
        return found

    def put(self, items: list[tuple[str, str, str]], ctx: tuple[str, str, str, str]) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.db.executemany(
            "INSERT OR REPLACE INTO translations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(self.text_hash(text), *ctx, out, lang, now) for text, out, lang in items],
        )
        self.db.commit()  # before the output is written: a kill after this loses nothing paid for

    def glossary_id(self, entries_hash: str, server: str) -> str | None:
        row = self.db.execute(
            "SELECT glossary_id FROM glossaries WHERE entries_hash=? AND server=?", (entries_hash, server)
        ).fetchone()
        return row[0] if row else None

    def put_glossary(self, entries_hash: str, server: str, glossary_id: str) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO glossaries VALUES (?, ?, ?)", (entries_hash, server, glossary_id)
        )
        self.db.commit()

    def close(self) -> None:
        self.db.close()


# --------------------------------------------------------------------------- input and output


@dataclass
class SourceRecord:
    index: int  # position in the input
    where: str  # "line 12"
    raw: dict[str, Any]
    fields: dict[str, str]  # instruction / input / output after --columns


def read_input(path: str, columns: dict[str, str]) -> list[SourceRecord]:
    """Every record of ``path``, checked with kaika's data rules before anything is sent."""
    problems: list[Problem] = []
    records = []
    for where, rec in iter_source(path, problems):
        norm = normalise_record(rec, columns, path, where, problems)
        if norm is not None:
            records.append(SourceRecord(len(records), where, rec, norm))
    if not records and not problems:
        problems.append(Problem(path, "file", None, "contains no records"))
    if problems:
        raise DataError(problems)
    return records


def select(n: int, limit: int | None, sample: int | None, seed: int) -> list[int]:
    if limit is not None and sample is not None:
        raise KaikaError("give --limit or --sample, not both")
    for name, value in (("limit", limit), ("sample", sample)):
        if value is not None and value < 1:
            raise KaikaError(f"--{name} must be at least 1, got {value}")
    if limit is not None:
        return list(range(min(limit, n)))
    if sample is not None:
        return sorted(random.Random(seed).sample(range(n), min(sample, n)))
    return list(range(n))


def default_output(input_path: str, target_lang: str) -> Path:
    p = Path(input_path)
    return p.with_name(f"{p.stem}.{target_lang.lower()}.jsonl")


def read_done(output: Path, source: str, target_lang: str, repair: bool = True) -> set[int]:
    """Input indices the output already holds. A torn last line (killed mid-write) is cut off
    (``repair``), but only once every whole line has shown the file to be a kaika translation of
    this input: a file that is not one is refused untouched."""
    if not output.exists():
        return set()
    raw = output.read_bytes()
    keep = raw.rfind(b"\n") + 1 if raw and not raw.endswith(b"\n") else len(raw)
    done = set()
    for lineno, line in enumerate(raw[:keep].decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prov = json.loads(line)[PROVENANCE_KEY]
            index, prev_source, prev_target = prov["index"], prov["source"], prov["target_lang"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise KaikaError(
                f"{output}, line {lineno}: not a kaika translate record (no {PROVENANCE_KEY} provenance); "
                "choose another --output"
            ) from None
        if Path(prev_source).name != Path(source).name or prev_target != target_lang:
            raise KaikaError(
                f"{output}, line {lineno}: holds a translation of {prev_source} into {prev_target}, not of "
                f"{source} into {target_lang}; choose another --output"
            )
        done.add(index)
    if keep < len(raw):
        if not done:  # nothing shows the file is ours: never cut a stranger's file
            raise KaikaError(
                f"{output}: its only line is unfinished and not a kaika translate record; "
                "choose another --output"
            )
        if repair:
            log.info("%s: dropping an unfinished last line (the previous run was stopped mid-write)", output)
            with output.open("r+b") as fh:
                fh.truncate(keep)
    return done


# --------------------------------------------------------------------------- DeepL


@dataclass
class Job:
    """One record to translate: its fields' protected XML (sent) or text (copied)."""

    rec: SourceRecord
    xml: dict[str, str]  # field -> XML to send
    spans: dict[str, list[str]]  # field -> protected spans
    copied: list[str]  # fields not sent


def plan(rec: SourceRecord, fields: list[str]) -> Job:
    job = Job(rec, {}, {}, [])
    for fld in FIELDS:
        text = rec.fields[fld]
        if fld in fields and needs_translation(text):
            job.xml[fld], job.spans[fld] = protect(text)
        elif text:
            job.copied.append(fld)
    return job


def batches(jobs: list[Job], max_texts: int) -> Iterator[list[Job]]:
    """Whole records per batch, at most ``max_texts`` texts and ~MAX_REQUEST_BYTES per request."""
    batch: list[Job] = []
    texts = size = 0
    for job in jobs:
        n = len(job.xml)
        b = sum(len(x.encode("utf-8")) for x in job.xml.values())
        if batch and (texts + n > max_texts or size + b > MAX_REQUEST_BYTES):
            yield batch
            batch, texts, size = [], 0, 0
        batch.append(job)
        texts += n
        size += b
    if batch:
        yield batch


def read_glossary_file(path: Path) -> dict[str, str]:
    entries: dict[str, str] = {}
    delim = "," if path.suffix.lower() == ".csv" else "\t"
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split(delim)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise KaikaError(f"{path}, line {lineno}: expected 'source{delim!r}target', got {line!r}")
        entries[parts[0].strip()] = parts[1].strip()
    if not entries:
        raise KaikaError(f"{path}: the glossary has no entries")
    return entries


class DeepLSession:
    """The deepl client, created only when something must be sent, plus the glossary it uses."""

    def __init__(self, args: TranslateArgs, cache: TranslationCache):
        self.args, self.cache = args, cache
        self._translator = None
        self._glossary_id: str | None = None
        self.glossary_entries: dict[str, str] | None = None
        self.glossary_key = ""
        if args.glossary:
            if args.source_lang is None:
                raise KaikaError(
                    "--glossary needs --source-lang (DeepL applies glossaries to one language pair)"
                )
            gpath = Path(args.glossary)
            if gpath.is_file():
                self.glossary_entries = read_glossary_file(gpath)
                blob = json.dumps(sorted(self.glossary_entries.items()), ensure_ascii=False)
                self.glossary_key = "entries:" + hashlib.sha256(blob.encode()).hexdigest()
            else:
                self._glossary_id = args.glossary
                self.glossary_key = "id:" + args.glossary

    def options_key(self) -> str:
        a = self.args
        return json.dumps(
            {
                "formality": a.formality,
                "tag_handling": "xml",
                "ignore_tags": [IGNORE_TAG],
                "preserve_formatting": True,
            },
            sort_keys=True,
        )

    def context(self) -> tuple[str, str, str, str]:
        return (
            (self.args.source_lang or "").upper(),
            self.args.target_lang.upper(),
            self.options_key(),
            self.glossary_key,
        )

    def uncached(self, job: Job) -> bool:
        """Whether ``job`` has a field the cache cannot answer (so DeepL must be asked)."""
        wanted = list(job.xml.values())
        return len(self.cache.get(wanted, self.context())) < len(set(wanted))

    def translator(self):
        if self._translator is None:
            import deepl  # optional at import time: dry runs and cache-only resumes never need it

            from kaika import __version__

            key = self.args.auth_key or os.environ.get("DEEPL_AUTH_KEY")
            if not key:
                raise KaikaError(
                    "no DeepL auth key: set DEEPL_AUTH_KEY or pass --auth-key (or use --dry-run)"
                )
            # The client retries 429 and 5xx itself, with exponential backoff (deepl.http_client).
            deepl.http_client.max_network_retries = self.args.max_retries
            self._translator = deepl.Translator(
                key, server_url=self.args.server_url, send_platform_info=False
            ).set_app_info("kaika", __version__)
        return self._translator

    def glossary(self) -> str | None:
        if self.glossary_entries is not None and self._glossary_id is None:
            server = self.args.server_url or ""
            self._glossary_id = self.cache.glossary_id(self.glossary_key, server)
            if self._glossary_id is None:
                info = self.translator().create_glossary(
                    f"kaika-{self.glossary_key[8:20]}",
                    self.args.source_lang,
                    self.args.target_lang,
                    self.glossary_entries,
                )
                self._glossary_id = info.glossary_id
                self.cache.put_glossary(self.glossary_key, server, self._glossary_id)
        return self._glossary_id

    def translate(self, texts: list[str]) -> list[tuple[str, str, int]]:
        results = self.translator().translate_text(
            texts,
            source_lang=self.args.source_lang,
            target_lang=self.args.target_lang,
            formality=self.args.formality,
            glossary=self.glossary(),
            tag_handling="xml",
            ignore_tags=[IGNORE_TAG],
            preserve_formatting=True,
        )
        return [(r.text, r.detected_source_lang, r.billed_characters) for r in results]


def stop_reason(err: Exception) -> str | None:
    """A user-facing reason for the deepl exceptions that end a run; None for others."""
    import deepl

    if isinstance(err, deepl.QuotaExceededException):
        return "DeepL quota exceeded (HTTP 456): the character limit of this key is used up for now."
    if isinstance(err, deepl.AuthorizationException):
        return (
            "DeepL refused the auth key (HTTP 403): check DEEPL_AUTH_KEY / --auth-key (free keys end in :fx; "
            "--server-url must match the key's plan)."
        )
    if isinstance(err, deepl.TooManyRequestsException):
        return "DeepL is still rate-limiting (HTTP 429) after the client's retries; wait and run again."
    if isinstance(err, deepl.ConnectionException):
        return f"cannot reach DeepL after the client's retries: {err}"
    if isinstance(err, deepl.DeepLException):
        return f"DeepL error: {err}"
    return None


# --------------------------------------------------------------------------- the run


def translate_file(input_path: str, args: TranslateArgs) -> TranslateResult:
    check_args(args)
    records = read_input(input_path, args.columns)  # all input checked before anything is sent
    chosen = select(len(records), args.limit, args.sample, args.seed)
    output = Path(args.output) if args.output else default_output(input_path, args.target_lang)
    check_output_file(output, [input_path])
    done = read_done(output, input_path, args.target_lang, repair=not args.dry_run)
    result = TranslateResult(output, selected=len(chosen), already_done=len(done & set(chosen)))
    jobs = [plan(records[i], args.fields) for i in chosen if i not in done]
    cache = TranslationCache(Path(args.cache) if args.cache else default_cache())
    try:
        session = DeepLSession(args, cache)
        if args.dry_run:
            return estimate(jobs, session, result, args.price_per_million)
        if any(session.uncached(job) for job in jobs):
            session.translator()  # no key: say so before the output file is created
        run_jobs(jobs, input_path, session, output, result)
    finally:
        cache.close()
    return result


def check_args(args: TranslateArgs) -> None:
    """The rules of the fields again, for arguments assigned after they were built (Python API)."""
    check(args, "translate options")


def default_cache() -> Path:
    from kaika.modeling.builtin import cache_dir

    return cache_dir() / "deepl_cache.sqlite"


def estimate(
    jobs: list[Job], session: DeepLSession, result: TranslateResult, price: float
) -> TranslateResult:
    """Characters that would be billed (source text of each field to send), minus what is cached."""
    ctx = session.context()
    for fld in FIELDS:
        result.characters[fld] = 0
    for job in jobs:
        hits = session.cache.get(list(job.xml.values()), ctx)
        for fld, xml in job.xml.items():
            n = len(job.rec.fields[fld])
            if xml in hits:
                result.cached_characters += n
            else:
                result.characters[fld] += n
        result.copied_fields += len(job.copied)
    result.dry_run, result.price_per_million = True, price
    result.estimated_cost = sum(result.characters.values()) / 1e6 * price
    return result


def run_jobs(
    jobs: list[Job], source: str, session: DeepLSession, output: Path, result: TranslateResult
) -> None:
    from tqdm.auto import tqdm

    ctx = session.context()
    output.parent.mkdir(parents=True, exist_ok=True)
    today = dt.datetime.now(dt.UTC).date().isoformat()
    with (
        output.open("a", encoding="utf-8") as fh,
        tqdm(total=len(jobs), desc="translating", unit="rec") as bar,
    ):
        for batch in batches(jobs, session.args.batch_size):
            wanted = list(dict.fromkeys(x for job in batch for x in job.xml.values()))
            have = session.cache.get(wanted, ctx)
            result.cache_hits += len(have)
            missing = [x for x in wanted if x not in have]
            if missing:
                try:
                    answers = session.translate(missing)
                except KeyboardInterrupt:
                    raise TranslationStopped("interrupted.", result) from None
                except Exception as e:
                    reason = stop_reason(e)
                    if reason is None:
                        raise
                    raise TranslationStopped(reason, result) from e
                result.requests += 1
                result.texts_sent += len(missing)
                result.characters_sent += sum(billed for _, _, billed in answers)
                session.cache.put(
                    [(x, t, lang) for x, (t, lang, _) in zip(missing, answers, strict=True)], ctx
                )
                have.update((x, (t, lang)) for x, (t, lang, _) in zip(missing, answers, strict=True))
            for job in batch:
                fh.write(
                    json.dumps(finish(job, have, source, session, today, result), ensure_ascii=False) + "\n"
                )
                result.written += 1
            fh.flush()  # what is written survives a kill of this process
            bar.update(len(batch))


def finish(
    job: Job,
    have: dict[str, tuple[str, str]],
    source: str,
    session: DeepLSession,
    today: str,
    result: TranslateResult,
) -> dict[str, Any]:
    """The output record: translated fields, the input's other keys, and provenance."""
    rec, args = job.rec, session.args
    out: dict[str, Any] = dict(rec.fields)
    detected, lost = set(), 0
    for fld, xml in job.xml.items():
        text, lang = have[xml]
        out[fld], n = restore(text, job.spans[fld])
        lost += n
        if lang:
            detected.add(lang.upper())
    result.copied_fields += len(job.copied)
    result.lost_spans += lost
    mapped = {args.columns.get(f, f) for f in FIELDS}
    out.update({k: v for k, v in rec.raw.items() if k not in mapped and k != PROVENANCE_KEY})
    prov: dict[str, Any] = {
        "source": source,
        "index": rec.index,
        "where": rec.where,
        "engine": "deepl",
        "source_lang": args.source_lang or "/".join(sorted(detected)) or None,
        "target_lang": args.target_lang,
        "date": today,
    }
    for key in ("id", "index", "uid"):
        if key in rec.raw:
            prov["source_id"] = rec.raw[key]
            break
    if args.formality:
        prov["formality"] = args.formality
    if session.glossary_key:
        prov["glossary"] = session.glossary_key
    if job.copied:
        prov["copied"] = job.copied
    if lost:
        prov["lost_protected_spans"] = lost
    out[PROVENANCE_KEY] = prov
    return out


def print_result(r: TranslateResult) -> None:
    if r.dry_run:
        total = sum(r.characters.values())
        todo = r.selected - r.already_done
        print(
            f"dry run: {todo} of {r.selected} records to translate ({r.already_done} already in {r.output})"
        )
        print(f"  {'field':<12} {'characters to send':>20}")
        for fld, n in r.characters.items():
            print(f"  {fld:<12} {n:>20,}")
        print(f"  {'total':<12} {total:>20,}")
        print(
            f"  already in the cache (free): {r.cached_characters:,} characters; "
            f"not sent (empty, numbers-only or code-only fields): {r.copied_fields}"
        )
        print(
            f"  estimated cost: {r.estimated_cost:.2f} at {r.price_per_million:g} per million characters "
            "(DeepL API Pro usage price, EUR; the plan's monthly base price comes on top; "
            "DeepL API Free includes 500,000 characters a month)"
        )
        return
    print(
        f"{r.done}/{r.selected} records translated in {r.output} ({r.written} this run, {r.already_done} "
        f"before); {r.texts_sent} texts sent in {r.requests} requests ({r.characters_sent:,} billed characters), "
        f"{r.cache_hits} from the cache, {r.copied_fields} fields copied unsent"
        + (f"; {r.lost_spans} protected spans dropped by DeepL were re-appended" if r.lost_spans else "")
    )
