"""kaika translate against a local DeepL-compatible server, through the real ``deepl`` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from deepl_fake import PREFIX, FakeDeepL, fake_translate
from helpers import write_jsonl
from kaika.cli import main
from kaika.data.records import FIELDS, load_records
from kaika.data.translate import IGNORE_TAG, PROVENANCE_KEY, needs_translation, protect, restore, select

CODE = "```python\n# add one to x\nx = x + 1  # see https://example.com\n```"
RECORDS = [
    {
        "instruction": "Explain what the code does.",
        "input": CODE,
        "output": "It adds `1` to x & keeps <b>it</b>.",
    },
    {"instruction": "What is 17 times 3?", "input": "", "output": "51"},
    {
        "instruction": "Read https://example.com/a?b=1 and summarise it.",
        "input": "",
        "output": "It is short.",
    },
    {"instruction": "Fill the template.", "input": "Dear {name}, your code is %s.", "output": "Dear Ann."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue.", "id": "rec-5", "category": "open_qa"},
    {"instruction": "Write a haiku about rain.", "input": "", "output": "Rain on the roof\nsoft drums"},
    {"instruction": "Give the year Python 3 came out.", "input": "", "output": "2008"},
    {"instruction": "Say hello in French.", "input": "", "output": "Bonjour."},
]


def expected(text: str) -> str:
    """What kaika must write for ``text``: the fake translation of its protected form, restored."""
    if not needs_translation(text):
        return text
    xml, spans = protect(text)
    return restore(fake_translate(xml, [IGNORE_TAG]), spans)[0]


def sendable(records) -> list[str]:
    return [protect(r[f])[0] for r in records for f in FIELDS if needs_translation(r[f])]


def run_cli(server, src: Path, out: Path, cache: Path, *extra: str) -> int:
    return main(
        ["translate", str(src), "--output", str(out), "--cache", str(cache), "--server-url", server.url,
         "--auth-key", server.auth_key, "--batch-size", "3", "--max-retries", "2", *extra]
    )  # fmt: skip


def read_out(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def src(tmp_path):
    return write_jsonl(tmp_path / "en.jsonl", RECORDS)


# --------------------------------------------------------------------------- protection


@pytest.mark.parametrize(
    "text",
    [
        CODE,
        "Use `ls -la` then open http://x.org/p_(1) now.",
        "Mail a@b.co about {user} and {{var}} and %(n)d, ${HOME}.",
        "Tags <br/> and <a href='x'>link</a>, 3 < 4 & 5 > 2.",
        "No code here, just prose.",
        "```\nunclosed fence\nkeeps going",
    ],
)
def test_protect_restore_round_trip(text):
    xml, spans = protect(text)
    assert restore(xml, spans) == (text, 0)
    # DeepL sees well-formed XML: every protected span is inside an ignore tag, the rest escaped.
    assert xml.count(f"<{IGNORE_TAG} ") == len(spans)
    assert all(s in text for s in spans)


def test_restore_puts_back_exact_spans_and_counts_lost_ones():
    xml, spans = protect("Run `a` then `b`.")
    mangled = xml.replace("`a`", "`A`")  # whatever comes back inside the tag, the original is restored
    assert restore(mangled, spans) == ("Run `a` then `b`.", 0)
    dropped = mangled.replace(f'<{IGNORE_TAG} i="1">`b`</{IGNORE_TAG}>', "")
    assert restore(dropped, spans) == ("Run `a` then .`b`", 1)


def test_what_needs_translation():
    assert not needs_translation("1,234.5 %")
    assert not needs_translation(CODE)
    assert not needs_translation("")
    assert needs_translation("It is 5.")
    assert needs_translation("東京")


def test_select():
    assert select(10, 3, None, 0) == [0, 1, 2]
    s = select(100, None, 10, 7)
    assert s == sorted(s) and len(set(s)) == 10 and s == select(100, None, 10, 7) != select(100, None, 10, 8)
    from kaika.errors import KaikaError

    with pytest.raises(KaikaError, match="not both"):
        select(10, 1, 1, 0)


# --------------------------------------------------------------------------- runs against the server


def test_normal_run_then_nothing_sent_again(src, tmp_path, capsys):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL() as server:
        assert run_cli(server, src, out, cache) == 0
        recs = read_out(out)
        assert [r[PROVENANCE_KEY]["index"] for r in recs] == list(range(len(RECORDS)))
        for rec, orig in zip(recs, RECORDS, strict=True):
            for f in FIELDS:
                assert rec[f] == expected(orig[f])
            prov = rec[PROVENANCE_KEY]
            assert prov["engine"] == "deepl" and prov["target_lang"] == "JA" and prov["source"] == str(src)
            assert prov["source_lang"] == "EN" and len(prov["date"]) == 10
        # code block untouched, byte for byte; the prose around it translated
        assert recs[0]["input"] == CODE and recs[0]["instruction"].startswith(PREFIX)
        assert "`1`" in recs[0]["output"] and "<b>" in recs[0]["output"] and "&" in recs[0]["output"]
        assert "https://example.com/a?b=1" in recs[2]["instruction"]
        assert "{name}" in recs[3]["input"] and "%s" in recs[3]["input"]
        # numbers-only answers are copied, not sent
        assert recs[1]["output"] == "51" and recs[1][PROVENANCE_KEY]["copied"] == ["output"]
        assert "51" not in server.answered_texts and "2008" not in server.answered_texts
        # extra keys kept, their id in the provenance
        assert recs[4]["category"] == "open_qa" and recs[4][PROVENANCE_KEY]["source_id"] == "rec-5"
        # each text sent exactly once, as XML with ignore tags; options as asked
        assert Counter(server.answered_texts) == Counter(sendable(RECORDS))
        body = server.requests[0]
        assert (
            body["tag_handling"] == "xml"
            and body["ignore_tags"] == [IGNORE_TAG]
            and body["target_lang"] == "JA"
        )
        assert all(len(b["text"]) <= 3 for b in server.requests)  # --batch-size 3

        before = out.read_bytes()
        n_requests = server.answered_requests
        assert run_cli(server, src, out, cache) == 0  # everything already in the output
        assert out.read_bytes() == before
        assert run_cli(server, src, tmp_path / "again.jsonl", cache) == 0  # new output, same cache
        assert server.answered_requests == n_requests and len(server.requests) == n_requests
        assert [r[f] for r in read_out(tmp_path / "again.jsonl") for f in FIELDS] == [
            r[f] for r in read_out(out) for f in FIELDS
        ]
    assert "8/8 records translated" in capsys.readouterr().out
    # a dry run over a new output now finds everything in the cache: nothing to pay
    assert (
        main(
            [
                "translate",
                str(src),
                "--output",
                str(tmp_path / "new.jsonl"),
                "--cache",
                str(cache),
                "--dry-run",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    total = sum(len(r[f]) for r in RECORDS for f in FIELDS if needs_translation(r[f]))
    assert (
        f"{'total':<12} {0:>20,}" in printed
        and f"already in the cache (free): {total:,} characters" in printed
    )


@pytest.mark.slow
def test_resume_after_kill_sends_nothing_twice(src, tmp_path):
    """SIGKILL the real CLI while a request is in flight, then rerun: no answered text is resent."""
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL(gate_after=2) as server:
        cmd = [sys.executable, "-m", "kaika", "translate", str(src), "--output", str(out), "--cache", str(cache),
               "--server-url", server.url, "--auth-key", server.auth_key, "--batch-size", "2"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
        try:
            assert server.held.wait(120), proc.communicate(timeout=5)[0]
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
        server.release()
        first = list(server.answered_texts)
        partial = read_out(out)
        assert server.answered_requests == 2 and 0 < len(partial) < len(RECORDS)
        assert server.abandoned_texts  # the request in flight when the process died

        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        second = server.answered_texts[len(first) :]
        assert not set(first) & set(second), "a text answered before the kill was sent again"
        assert set(server.abandoned_texts) <= set(second)
        assert Counter(server.answered_texts) == Counter(sendable(RECORDS))
    recs = read_out(out)
    assert sorted(r[PROVENANCE_KEY]["index"] for r in recs) == list(range(len(RECORDS)))
    assert [r["output"] for r in recs] == [expected(r["output"]) for r in RECORDS]


def test_torn_last_line_is_redone_from_the_cache(src, tmp_path):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL() as server:
        assert run_cli(server, src, out, cache) == 0
        full = out.read_bytes()
        lines = full.splitlines(keepends=True)
        out.write_bytes(b"".join(lines[:5]) + lines[5][:17])  # killed in the middle of writing line 6
        n = server.answered_requests
        assert run_cli(server, src, out, cache) == 0
        assert server.answered_requests == n  # all from the cache
    assert out.read_bytes() == full  # same records, same order
    assert [r[PROVENANCE_KEY]["index"] for r in read_out(out)] == list(range(len(RECORDS)))


def test_429_then_success(src, tmp_path):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL(fail_429=1) as server:
        assert run_cli(server, src, out, cache) == 0  # the deepl client retried, with its backoff
        assert server.statuses[429] == 1
        assert Counter(server.answered_texts) == Counter(sendable(RECORDS))
    assert len(read_out(out)) == len(RECORDS)


def test_429_that_never_ends_stops_cleanly(src, tmp_path, capsys):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL(fail_429=100) as server:
        assert run_cli(server, src, out, cache, "--max-retries", "0") == 2
        assert server.statuses[429] == 1 and server.answered_requests == 0
    err = capsys.readouterr().err
    assert "429" in err and "Stopped after 0 of 8 records" in err


def test_quota_exceeded_mid_run_then_resume(src, tmp_path, capsys):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL(quota_requests=2) as server:
        assert run_cli(server, src, out, cache) == 2
        err = capsys.readouterr().err
        partial = read_out(out)  # valid JSONL, every line complete
        assert 0 < len(partial) < len(RECORDS)
        assert "456" in err and f"Stopped after {len(partial)} of {len(RECORDS)} records" in err
        assert server.statuses[456] == 1 and server.answered_requests == 2
        first = list(server.answered_texts)

        server.quota_requests = None  # a new billing period
        assert run_cli(server, src, out, cache) == 0
        assert not set(first) & set(server.answered_texts[len(first) :])
        assert Counter(server.answered_texts) == Counter(sendable(RECORDS))
    recs = read_out(out)
    assert [r[PROVENANCE_KEY]["index"] for r in recs] == list(range(len(RECORDS)))
    assert recs[: len(partial)] == partial


def test_bad_key_stops_with_a_message(src, tmp_path, capsys):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL(auth_key="the-real-key") as server:
        code = main(["translate", str(src), "--output", str(out), "--cache", str(cache),
                     "--server-url", server.url, "--auth-key", "wrong"])  # fmt: skip
        assert code == 2 and server.statuses[403] == 1 and server.answered_requests == 0
    err = capsys.readouterr().err
    assert "403" in err and "DEEPL_AUTH_KEY" in err and "Stopped after 0 of 8" in err
    assert not out.exists() or read_out(out) == []


def test_key_from_environment_and_missing_key(src, tmp_path, monkeypatch, capsys):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    monkeypatch.delenv("DEEPL_AUTH_KEY", raising=False)
    with FakeDeepL() as server:
        args = [
            "translate",
            str(src),
            "--output",
            str(out),
            "--cache",
            str(cache),
            "--server-url",
            server.url,
        ]
        assert main(args) == 2
        assert "no DeepL auth key" in capsys.readouterr().err and server.requests == []
        monkeypatch.setenv("DEEPL_AUTH_KEY", server.auth_key)
        assert main([*args, "--limit", "2"]) == 0
    assert [r[PROVENANCE_KEY]["index"] for r in read_out(out)] == [0, 1]


def test_dry_run_counts_characters_and_sends_nothing(src, tmp_path, capsys):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    assert main(["translate", str(src), "--output", str(out), "--cache", str(cache), "--dry-run",
                 "--price-per-million", "1000000"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    per_field = {f: sum(len(r[f]) for r in RECORDS if needs_translation(r[f])) for f in FIELDS}
    for f, n in per_field.items():
        assert f"{f:<12} {n:>20,}" in printed
    total = sum(per_field.values())
    assert (
        f"estimated cost: {total:.2f} at 1e+06 per million" in printed
    )  # price 1e6 per million = 1 per char
    assert not out.exists()


def test_glossary_and_formality(src, tmp_path):
    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    gloss = tmp_path / "terms.tsv"
    gloss.write_text("haiku\t俳句\nrain\t雨\n", encoding="utf-8")
    with FakeDeepL() as server:
        assert run_cli(server, src, out, cache, "--limit", "6", "--source-lang", "EN", "--glossary", str(gloss),
                       "--formality", "more") == 0  # fmt: skip
        assert len(server.glossaries) == 1
        assert all(b["formality"] == "more" and b["glossary_id"] == "gloss-1" for b in server.requests)
        rec = read_out(out)[5]
        assert "俳句" in rec["instruction"] and "雨" in rec["instruction"]
        assert rec[PROVENANCE_KEY]["glossary"].startswith("entries:")
        # a run without the glossary is a different translation: not served from the glossary's cache
        n = len(server.answered_texts)
        assert run_cli(server, src, tmp_path / "plain.jsonl", cache, "--limit", "6") == 0
        assert len(server.answered_texts) == 2 * n
        # the same glossary again: the server's glossary is reused, everything comes from the cache
        assert run_cli(server, src, tmp_path / "g2.jsonl", cache, "--limit", "6", "--source-lang", "EN",
                       "--glossary", str(gloss), "--formality", "more") == 0  # fmt: skip
        assert len(server.glossaries) == 1 and len(server.answered_texts) == 2 * n


def test_output_of_another_file_is_refused(src, tmp_path, capsys):
    out = write_jsonl(tmp_path / "ja.jsonl", [{"instruction": "x", "input": "", "output": "y"}])
    assert main(["translate", str(src), "--output", str(out), "--dry-run"]) == 2
    assert "not a kaika translate record" in capsys.readouterr().err


def test_training_data_loading_ignores_provenance(src, tmp_path):
    """What kaika train reads from a translated file: the three fields, never ``_kaika``."""
    from kaika.config import TrainConfig
    from kaika.training.sft import load_data

    out, cache = tmp_path / "ja.jsonl", tmp_path / "cache.sqlite"
    with FakeDeepL() as server:
        assert run_cli(server, src, out, cache) == 0
    assert all(PROVENANCE_KEY in r for r in read_out(out))
    cfg = TrainConfig()
    cfg.data.data = [str(out)]
    train_records, _ = load_data(cfg)
    assert len(train_records) == len(RECORDS)
    assert all(set(r) == set(FIELDS) for r in train_records)
    assert load_records([str(out)]) == train_records


def test_columns_of_the_english_dolly_shape(tmp_path):
    """Dolly's English file says context/response: mapped in, written out as input/output."""
    dolly = [
        {
            "instruction": "Who wrote Hamlet?",
            "context": "A play.",
            "response": "Shakespeare.",
            "category": "open_qa",
        }
    ]
    src = write_jsonl(tmp_path / "dolly.jsonl", dolly)
    out = tmp_path / "ja.jsonl"
    with FakeDeepL() as server:
        assert (
            run_cli(server, src, out, tmp_path / "c.sqlite", "--columns", "input=context", "output=response")
            == 0
        )
    (rec,) = read_out(out)
    assert set(rec) == {*FIELDS, "category", PROVENANCE_KEY}
    assert (rec["input"], rec["output"]) == (expected("A play."), expected("Shakespeare."))
