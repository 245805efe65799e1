"""A minimal OpenAI-compatible chat-completions server for tests (stdlib only, 127.0.0.1, random free port).

It answers deterministically from the prompt: it takes the text after the last ``Query:`` in the last user
message and the labels listed in the system prompt (lines ``- label``), and asks the test's ``responder``
(a dict query -> answer, or a callable ``(query, listed_labels) -> answer``). ``status`` makes every request
fail with that HTTP status; a 401 echoes the bearer key in its body, as some servers do. ``requests`` records
every JSON body received, so tests can count round trips.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[str, list], str]


def parse_prompt(messages: list[dict]) -> tuple[str, list[str]]:
    """(query, labels listed in the system prompt) of a chat as cm_core.prompts builds it."""
    system = next((m["content"] for m in messages if m.get("role") == "system"), "")
    listed = [ln[2:].strip() for ln in system.splitlines() if ln.startswith("- ")]
    user = [m["content"] for m in messages if m.get("role") == "user"]
    query = ""
    if user:
        found = re.findall(r"Query: (.*)", user[-1])
        query = found[-1].strip() if found else user[-1].strip()
    return query, listed


class FakeOpenAIServer:
    def __init__(self, responder: dict | Responder | None = None, *, status: int = 200, default: str = "no idea",
                 max_choices: int | None = None):
        self.responder = responder or {}
        self.status = status
        self.max_choices = max_choices  # return fewer choices than asked for (servers that ignore ``n``)
        self.default = default
        self.requests: list[dict] = []  # every JSON body received, in order
        self.auth_headers: list[str] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {}
                with server._lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                if server.status == 401:
                    key = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {key}. You can find "
                                                                 "your API key in your account settings.",
                                                      "type": "invalid_request_error", "code": "invalid_api_key"}})
                if server.status != 200:
                    return self._send(server.status, {"error": {"message": "the fake server is failing on purpose",
                                                                "type": "server_error"}})
                answer = server.answer(body.get("messages") or [])
                n = int(body.get("n") or 1)
                if server.max_choices is not None:
                    n = min(n, server.max_choices)
                choices = [{"index": i, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop",
                            "logprobs": None} for i in range(n)]
                return self._send(200, {"id": f"chatcmpl-fake{len(server.requests)}", "object": "chat.completion",
                                        "created": 0, "model": body.get("model", "fake"), "choices": choices,
                                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status: int, obj: dict):
                data = json.dumps(obj).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ behaviour
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def answer(self, messages: list[dict]) -> str:
        query, listed = parse_prompt(messages)
        if callable(self.responder):
            return self.responder(query, listed)
        return self.responder.get(query, self.default)
