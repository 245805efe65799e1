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

Scoring (``completions=``): by default ``/v1/completions`` answers 404, as a chat-only server. ``"echo"`` answers it
as llama.cpp's ``llama-cpp-python`` server does (``echo`` + ``logprobs``: the prompt's tokens and their
log-probabilities, special tokens shown as nothing, then one generated token; one prompt per request unless
``batch_prompts``), ``"prompt_logprobs"`` as vLLM's extension does (``prompt_logprobs``: one ``{id: {logprob,
rank, decoded_token}}`` per prompt token, the first None). The prompt is read back as ChatML; the assistant's reply
at its end scores ``GOOD`` per token when it is the responder's answer to the query, else ``BAD``; other tokens
``OTHER``. Those requests go to ``completion_requests``, never to ``requests`` (and take no fault), so tests that
count chat round trips are unchanged by the backend's one-time probe. Chat replies report ``usage.prompt_tokens``
as the ChatML prompt's token count (``template_tokens_offset`` adds to it: a server whose template differs).
"""
from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

Responder = Callable[[str, list], str]
GOOD, BAD, OTHER, END = -0.1, -2.0, -1.0, -0.5  # fake token log-probabilities (see ``completions``)
_TOKEN = re.compile(r"<\|[a-z_]+\|>|\s+|\w+|[^\w\s]")
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
                 hang: float = 3.0, trickle: float = 0.05, completions: str | None = None,
                 batch_prompts: bool = False, template_tokens_offset: int = 0):
        if completions not in (None, "echo", "prompt_logprobs"):
            raise ValueError(f"completions must be None, 'echo' or 'prompt_logprobs', got {completions!r}")
        self.completions, self.batch_prompts = completions, batch_prompts
        self.template_tokens_offset = template_tokens_offset
        self.completion_requests: list[dict] = []  # bodies sent to /v1/completions (not counted in ``requests``)
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
                if self.path.rstrip("/") == "/v1/completions":
                    with server._lock:
                        server.completion_requests.append(body)
                        if server.status == 401:  # a bad key is refused on every endpoint, with the key echoed
                            server.auth_headers.append(self.headers.get("Authorization", ""))
                    if server.status == 401:
                        return self._send(401, self._bad_key())
                    status, reply = server.complete(body)
                    return self._send(status, reply)
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
                    return self._send(401, self._bad_key())
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
                         "usage": server.usage(body.get("messages") or [])}
                if fault == "truncated":
                    data = json.dumps(reply).encode("utf-8")
                    return self._send(200, data[: len(data) // 2])
                if fault == "cut":
                    data = json.dumps(reply).encode("utf-8")
                    return self._send(200, data[: len(data) // 2], length=len(data), close=True)
                return self._send(200, reply, trickle=server.trickle if fault == "trickle" else 0.0)

            def _bad_key(self) -> dict:
                """OpenAI's 401 body, which quotes the key it was sent."""
                key = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
                return {"error": {"message": f"Incorrect API key provided: {key}. You can find your API key in your "
                                             "account settings.", "type": "invalid_request_error",
                                  "code": "invalid_api_key"}}

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

    # ------------------------------------------------------------------ scoring (/v1/completions)
    def usage(self, messages: list[dict]) -> dict:
        n = len(tokenize(chatml(messages))) + self.template_tokens_offset
        return {"prompt_tokens": n, "completion_tokens": 1, "total_tokens": n + 1}

    def complete(self, body: dict) -> tuple[int, dict]:
        prompts = body.get("prompt")
        if isinstance(prompts, list):
            if len(prompts) > 1 and not self.batch_prompts:  # llama-cpp-python asserts a single prompt
                return 500, {"error": {"message": "AssertionError", "type": "internal_server_error"}}
        else:
            prompts = [prompts or ""]
        if self.status != 200:
            return self.status, {"error": {"message": "the fake server is failing on purpose", "type": "server_error"}}
        if self.completions is None:
            return 404, {"error": {"message": "no route /v1/completions", "type": "not_found"}}
        choices = []
        for i, prompt in enumerate(prompts):
            tokens = tokenize(prompt)
            values = self.token_logprobs(prompt, tokens)
            choice = {"index": i, "text": "\n", "finish_reason": "length", "logprobs": None}
            if self.completions == "echo" and body.get("echo") and body.get("logprobs") is not None:
                shown = ["" if t.startswith("<|") else t for t in tokens] + ["\n"]
                offsets, pos = [], 0
                for t in shown:
                    offsets.append(pos)
                    pos += len(t)
                choice["text"] = prompt + "\n"
                choice["logprobs"] = {"tokens": shown, "text_offset": offsets,
                                      "token_logprobs": [None] + values[1:] + [OTHER],
                                      "top_logprobs": [None] + [{t: v} for t, v in zip(shown[1:], values[1:] + [OTHER])]}
            if self.completions == "prompt_logprobs" and (body.get("prompt_logprobs") is not None):
                choice["prompt_logprobs"] = [None] + [{str(1000 + k): {"logprob": v, "rank": 1, "decoded_token": t}}
                                                      for k, (t, v) in enumerate(zip(tokens[1:], values[1:]))]
            choices.append(choice)
        n = sum(len(tokenize(p)) for p in prompts)
        return 200, {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": body.get("model", "fake"),
                     "choices": choices, "usage": {"prompt_tokens": n, "completion_tokens": len(prompts),
                                                   "total_tokens": n + len(prompts)}}

    def token_logprobs(self, prompt: str, tokens: list[str]) -> list[float]:
        """OTHER for every token, but those of a final assistant reply (and the end of turn after it)."""
        values = [OTHER] * len(tokens)
        head, sep, reply = prompt.rpartition("<|im_start|>assistant\n")
        if not sep:
            return values
        closed = reply.endswith("<|im_end|>")
        answer = reply[: -len("<|im_end|>")] if closed else reply
        if not answer:
            return values
        good = answer == self.answer(parse_chatml(head))
        n_reply = len(tokenize(reply))
        for k in range(len(tokens) - n_reply, len(tokens)):
            values[k] = END if tokens[k] == "<|im_end|>" else (GOOD if good else BAD)
        return values


def tokenize(text: str) -> list[str]:
    """The fake's tokenizer: special tokens, runs of spaces, words, single other characters."""
    return _TOKEN.findall(text)


def chatml(messages: list[dict], add_generation_prompt: bool = True) -> str:
    text = "".join(f"<|im_start|>{m.get('role')}\n{m.get('content')}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def parse_chatml(text: str) -> list[dict]:
    messages = []
    for part in text.split("<|im_start|>")[1:]:
        role, _, content = part.partition("\n")
        messages.append({"role": role, "content": content.split("<|im_end|>")[0]})
    return messages
