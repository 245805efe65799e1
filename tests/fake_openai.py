"""A minimal OpenAI-compatible chat-completions server for tests (stdlib only, 127.0.0.1, random free port).

It answers deterministically from the prompt: it takes the text after the last ``Query:`` in the last user
message and the labels listed in the system prompt (lines ``- label``), and asks the test's ``responder``
(a dict query -> answer, or a callable ``(query, listed_labels) -> answer``). ``status`` makes every request
fail with that HTTP status; a 401 echoes the bearer key in its body, as some servers do. ``requests`` records
every JSON body received, so tests can count round trips.

Faults, for reliability tests (``faults=``: a list of fault names applied to the first requests in arrival order,
one per request, or a callable ``(request_index, body) -> fault name or None``; ``fault_log`` records what was
injected):

- ``"429"`` / ``"500"`` / ``"503"``: that HTTP status, with ``Retry-After: <retry_after>`` seconds (short, so the
  client's retries are fast);
- ``"timeout"``: hold the request ``hang`` seconds (longer than the client's timeout), then answer normally;
- ``"truncated"``: HTTP 200 whose JSON body is cut in half (Content-Length matches the cut body);
- ``"cut"``: Content-Length announces the whole body, half is sent, the connection closes;
- ``"no_choices"``: HTTP 200 with ``choices: []``;  ``"empty"``: every choice's content is ``""``;
  ``"null_content"``: every choice's content is ``null``;
- ``"off_set"``: a fluent answer that is none of the candidate labels;
- ``"bad_shape"``: HTTP 200 JSON that is not a chat completion (``{"choices": "oops"}``);
- ``"html"``: HTTP 200 ``text/html`` (a proxy's error page);
- ``"trickle"``: HTTP 200, the body sent one byte every ``trickle`` seconds (each read is quick, the reply slow).

``delay`` slows every request down (seconds), to interrupt runs midway; ``completed`` counts replies sent.
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[str, list], str]
FAULTS = ("429", "500", "503", "timeout", "truncated", "cut", "no_choices", "empty", "null_content", "off_set",
          "bad_shape", "html", "trickle")
OFF_SET_ANSWER = "Certainly! Here is a haiku about your query instead of a label."


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
                 max_choices: int | None = None, faults=None, delay: float = 0.0, retry_after: float = 0.01,
                 hang: float = 3.0, trickle: float = 0.05):
        self.responder = responder or {}
        self.status = status
        self.max_choices = max_choices  # return fewer choices than asked for (servers that ignore ``n``)
        self.default = default
        self.faults = faults  # list of fault names (first requests) or callable (index, body) -> name | None
        if faults is not None and not callable(faults):
            unknown = [f for f in faults if f is not None and f not in FAULTS]
            if unknown:
                raise ValueError(f"unknown faults {unknown}; faults: {FAULTS}")
        self.delay, self.retry_after, self.hang, self.trickle = delay, retry_after, hang, trickle
        self.requests: list[dict] = []  # every JSON body received, in order
        self.auth_headers: list[str] = []
        self.fault_log: list[tuple[int, str]] = []  # (request index, fault) for every fault injected
        self.completed = 0  # replies fully sent
        self.in_flight = self.max_in_flight = 0  # requests being handled at once (client concurrency)
        self._stopping = threading.Event()
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
                with server._lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._post()
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _post(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {}
                with server._lock:
                    index = len(server.requests)
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                fault = server._fault(index, body)
                if server.delay:
                    server._stopping.wait(server.delay)
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
                if fault in ("429", "500", "503"):
                    return self._send(int(fault), {"error": {"message": f"injected {fault}", "type": "server_error"}},
                                      headers={"Retry-After": f"{server.retry_after:g}"})
                if fault == "timeout":
                    server._stopping.wait(server.hang)  # the client has given up by now
                if fault == "html":
                    return self._send(200, b"<html><body>502 Bad Gateway</body></html>", content_type="text/html")
                if fault == "bad_shape":
                    return self._send(200, {"choices": "oops", "object": "chat.completion"})
                answer = server.answer(body.get("messages") or [])
                if fault == "off_set":
                    answer = OFF_SET_ANSWER
                content = {"empty": "", "null_content": None}.get(fault, answer)
                n = int(body.get("n") or 1)
                if server.max_choices is not None:
                    n = min(n, server.max_choices)
                if fault == "no_choices":
                    n = 0
                choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                            "logprobs": None} for i in range(n)]
                reply = {"id": f"chatcmpl-fake{index + 1}", "object": "chat.completion", "created": 0,
                         "model": body.get("model", "fake"), "choices": choices,
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                if fault == "truncated":
                    data = json.dumps(reply).encode("utf-8")
                    return self._send(200, data[: len(data) // 2])
                if fault == "cut":
                    data = json.dumps(reply).encode("utf-8")
                    return self._send(200, data[: len(data) // 2], length=len(data), close=True)
                return self._send(200, reply, trickle=server.trickle if fault == "trickle" else 0.0)

            def _send(self, status: int, obj, *, content_type: str = "application/json", headers: dict | None = None,
                      length: int | None = None, close: bool = False, trickle: float = 0.0):
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data) if length is None else length))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    if close:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    if trickle:
                        self.wfile.flush()
                        for i in range(len(data)):
                            if server._stopping.wait(trickle):
                                raise ConnectionAbortedError("the server is stopping")
                            self.wfile.write(data[i:i + 1])
                            self.wfile.flush()
                    else:
                        self.wfile.write(data)
                    self.wfile.flush()
                except OSError:  # the client gave up (timeout) and closed the connection
                    self.close_connection = True
                    return
                if close:
                    self.close_connection = True
                with server._lock:
                    server.completed += 1

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wake handlers sleeping in a delay or a hang
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

    def _fault(self, index: int, body: dict) -> str | None:
        f = self.faults
        if f is None:
            return None
        fault = f(index, body) if callable(f) else (f[index] if index < len(f) else None)
        if fault is not None:
            if fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; faults: {FAULTS}")
            with self._lock:
                self.fault_log.append((index, fault))
        return fault

    def answer(self, messages: list[dict]) -> str:
        query, listed = parse_prompt(messages)
        if callable(self.responder):
            return self.responder(query, listed)
        return self.responder.get(query, self.default)
