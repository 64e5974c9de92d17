"""A small real HTTP server speaking the OpenAI chat-completions wire format, for judge tests.

It runs on 127.0.0.1 (port chosen by the OS) in a thread, records every request it receives,
rejects requests that are not well-formed chat completions (or lack the expected API key), and
answers with a judgment chosen by ``reply(prompt)``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class JudgeServer:
    def __init__(self, reply: Callable[[str], tuple[int, str]], api_key: str | None = None):
        self.reply = reply  # prompt -> (HTTP status, judgment text or error message)
        self.api_key = api_key
        self.requests: list[dict] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body, ensure_ascii=False).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _reject(self, status: int, why: str) -> None:
                with server._lock:
                    server.rejected.append(why)
                self._send(status, {"error": {"message": why, "type": "invalid_request_error"}})

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._reject(404, f"unknown path {self.path}")
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    return self._reject(401, "bad or missing API key")
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                messages = body.get("messages")
                if not body.get("model") or not isinstance(messages, list) or not messages:
                    return self._reject(400, "model and messages are required")
                if not all(
                    isinstance(m, dict) and m.get("role") and isinstance(m.get("content"), str)
                    for m in messages
                ):
                    return self._reject(400, "each message needs a role and string content")
                with server._lock:
                    server.requests.append(body)
                status, text = server.reply(messages[-1]["content"])
                if status != 200:
                    return self._send(status, {"error": {"message": text, "type": "server_error"}})
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-{len(server.requests)}",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body["model"],
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    },
                )

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> JudgeServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def mt_bench_reply(prompt: str) -> tuple[int, str]:
    """An MT-Bench judge: 7 for every first turn, 3 for every second, no rating for question 1's first
    turn (unparseable); anything that is not an MT-Bench grading prompt is refused (400)."""
    if "ディレクトリ内の全てのテキストファイル" in prompt and "[質問]" in prompt:
        return 200, "よくわからない回答です。"  # question 1, turn 1: no [[N]]
    if "Assistant A's Conversation" in prompt:
        return 200, "The second answer is weak.\nRating: [[3]]"
    if "[アシスタントの回答の開始]" in prompt:
        return 200, "説明は簡潔です。評価：[[7]]"
    return 400, "not an MT-Bench grading prompt"
