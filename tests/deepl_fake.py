"""A small DeepL-compatible HTTP server for tests: the real ``deepl`` client talks to it.

It implements what the client sends for ``translate_text`` (POST /v2/translate, JSON body;
form bodies are accepted too), ``create_glossary`` (POST /v2/glossaries) and ``get_usage``
(GET /v2/usage), with DeepL's status codes: 403 for a wrong key, 429 and 456 on demand.

"Translation" is deterministic and reversible: outside tags, entities and ignore-tag
content, ASCII letters swap case and the text is prefixed with ``訳:``. Glossary terms are
replaced by their target first. Every request and every text answered is counted, so tests
can prove what was (and was not) sent.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "訳:"
_TOKENS = re.compile(r"(<[^>]+>|&#?\w+;)")


def fake_translate(text: str, ignore_tags: list[str], glossary: dict[str, str] | None = None) -> str:
    """What the server answers for ``text`` (tests compute expected outputs with it)."""
    out, ignored = [], 0
    for part in _TOKENS.split(text):
        if part.startswith("<") and part.endswith(">"):
            name = part.strip("</>").split()[0] if part.strip("</>") else ""
            if name in ignore_tags and not part.endswith("/>"):
                ignored += -1 if part.startswith("</") else 1
            out.append(part)
        elif (part.startswith("&") and part.endswith(";")) or ignored:
            out.append(part)
        else:
            for src, dst in (glossary or {}).items():
                part = part.replace(src, dst)
            out.append(part.swapcase())
    return PREFIX + "".join(out)


class FakeDeepL:
    """Start with ``with FakeDeepL(...) as server:``; ``server.url`` is the ``server_url``.

    - ``fail_429``: answer 429 to this many translate requests before serving normally.
    - ``quota_requests``: after this many translate requests answered, answer 456 to the rest
      (set ``server.quota_requests = None`` to lift the quota).
    - ``gate_after``: hold the translate request that comes after this many answered ones until
      ``server.release()`` (``server.held`` is set while one is held).
    """

    def __init__(self, auth_key="test-key:fx", fail_429=0, quota_requests=None, gate_after=None):
        self.auth_key = auth_key
        self.fail_429 = fail_429
        self.quota_requests = quota_requests
        self.gate_after = gate_after
        self.held = threading.Event()
        self._release = threading.Event()
        self.lock = threading.Lock()
        self.answered_requests = 0  # translate requests answered 200
        self.answered_texts: list[str] = []  # every text answered 200, in order (with repeats)
        self.abandoned_texts: list[str] = []  # texts of a held request (its client may be gone)
        self.statuses: Counter[int] = Counter()
        self.requests: list[dict] = []  # bodies of translate requests, as parsed
        self.glossaries: dict[str, dict] = {}
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)

    def release(self):
        self.gate_after = None
        self._release.set()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status, body):
                data = json.dumps(body, ensure_ascii=False).encode("utf-8")
                with fake.lock:
                    fake.statuses[status] += 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client went away (killed): nothing to answer
                    pass

            def _body(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    return json.loads(raw)
                form = urllib.parse.parse_qs(raw.decode("utf-8"))
                return {k: (v if k in ("text", "ignore_tags") else v[0]) for k, v in form.items()}

            def _authorised(self):
                if self.headers.get("Authorization") != f"DeepL-Auth-Key {fake.auth_key}":
                    self._send(403, {"message": "Wrong endpoint or invalid auth key"})
                    return False
                return True

            def do_GET(self):
                if not self._authorised():
                    return
                if self.path.startswith("/v2/usage"):
                    chars = sum(len(t) for t in fake.answered_texts)
                    self._send(200, {"character_count": chars, "character_limit": 500000})
                else:
                    self._send(404, {"message": "Not found"})

            def do_POST(self):
                if not self._authorised():
                    return
                body = self._body()
                if self.path.startswith("/v2/glossaries"):
                    return self._glossary(body)
                if not self.path.startswith("/v2/translate"):
                    return self._send(404, {"message": "Not found"})
                texts = body.get("text") or []
                if not texts or "target_lang" not in body:
                    return self._send(400, {"message": "Parameter 'text' or 'target_lang' missing"})
                with fake.lock:
                    fake.requests.append(body)
                    if fake.fail_429 > 0:
                        fake.fail_429 -= 1
                        status = 429
                    elif fake.quota_requests is not None and fake.answered_requests >= fake.quota_requests:
                        status = 456
                    else:
                        status = 200
                    hold = (
                        status == 200
                        and fake.gate_after is not None
                        and fake.answered_requests >= fake.gate_after
                    )
                if status == 429:
                    return self._send(429, {"message": "Too many requests"})
                if status == 456:
                    return self._send(456, {"message": "Quota Exceeded"})
                if hold:
                    with fake.lock:
                        fake.abandoned_texts.extend(texts)
                    fake.held.set()
                    fake._release.wait(30)
                    return self._send(503, {"message": "Service unavailable"})
                ignore = body.get("ignore_tags") or []
                if isinstance(ignore, str):
                    ignore = ignore.split(",")
                glossary = fake.glossaries.get(body.get("glossary_id", ""), {}).get("entries")
                out = [fake_translate(t, ignore, glossary) for t in texts]
                billed = [len(re.sub(r"<[^>]+>", "", t)) for t in texts]  # tags are not billed
                with fake.lock:
                    fake.answered_requests += 1
                    fake.answered_texts.extend(texts)
                self._send(
                    200,
                    {
                        "translations": [
                            {"detected_source_language": "EN", "text": o, "billed_characters": b}
                            for o, b in zip(out, billed, strict=True)
                        ]
                    },
                )

            def _glossary(self, body):
                entries = dict(line.split("\t", 1) for line in body["entries"].splitlines() if line)
                gid = f"gloss-{len(fake.glossaries) + 1}"
                fake.glossaries[gid] = {**body, "entries": entries}
                self._send(
                    201,
                    {
                        "glossary_id": gid,
                        "name": body["name"],
                        "ready": True,
                        "source_lang": body["source_lang"].lower(),
                        "target_lang": body["target_lang"].lower(),
                        "creation_time": "2026-01-01T00:00:00.000Z",
                        "entry_count": len(entries),
                    },
                )

        return Handler
