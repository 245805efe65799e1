"""OpenAI chat models and any OpenAI-compatible server (vLLM, Ollama, llama.cpp server) via ``base_url``.

The key comes from the environment (``OPENAI_API_KEY``) or the caller (the demo's key field); it is held by the
client only, never part of the identity, the cache key, a log line or an exception message. Requests are sent
with ``AsyncOpenAI`` on the backend's own event-loop thread, so callers stay synchronous and it works the same
inside Jupyter or Gradio, whose threads may already run a loop.

Faults. Every request is bounded in time: ``timeout`` limits each attempt as a whole (connect to last byte, so a
reply trickled a byte at a time cannot outlast it) and ``deadline`` the request with all its attempts and waits.
Timeouts, refused or dropped connections, HTTP 408/409/429/5xx, bodies that are not a chat completion, and
replies without text (``content: null`` from content filters, refusals or reasoning-only models, empty content,
no choices) are retried up to ``max_retries`` times with exponential back-off (honouring Retry-After). A request
that still has no usable reply is answered with :class:`~cm_core.backends.base.Failed`: it counts as a wrong
answer, is never cached and never enters a memory bank, and ``stats.failed`` counts it. HTTP 401/403/404 (a bad
key, model or URL) stop the whole call at once, and so does a server that looks down: every request of the call,
or ``breaker`` in a row, failed at the server level (not merely without text).

Throughput. ``generate_stream`` keeps ``concurrency`` requests in flight over the whole list it is given (a
sliding window, no batch barrier: a slow request delays only itself) and yields each answer as it arrives, so
the response cache saves it at once; a progress bar counts answers, retries and failures.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import queue
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator
from urllib.parse import urlsplit

from ..errors import BackendError, CMError
from .base import LLM, Failed, GenRequest

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0  # seconds per attempt, the whole reply
DEFAULT_MAX_RETRIES = 4
DEADLINE_FACTOR = 3  # default deadline: 3 x the timeout (a request gets at least 3 full attempts' time)
BREAKER = 8  # this many requests in a row failing at the server level: the server is down, stop
WARN_FAILURES = 5  # failed requests logged as warnings per backend; the rest at INFO (-v)
MAX_RETRY_AFTER = 60.0  # honour a server's Retry-After up to a minute
FATAL_STATUS = {401: "check the API key", 403: "check the API key's permissions",
                404: "check --base-url (it usually ends in /v1) and the model name"}


def check_base_url(url: str | None, what: str = "base URL") -> str | None:
    """``url`` if it is an http(s) URL with a host; else a one-line CMError, before anything is built or sent."""
    if url is None:
        return None
    shown = _no_userinfo(str(url))[:120]
    try:
        parts = urlsplit(str(url).strip())
        parts.port  # raises ValueError for a port that is not a number below 65536
    except ValueError as e:
        raise CMError(f"{what} {shown!r} is not a valid URL ({e}); e.g. http://127.0.0.1:8000/v1") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise CMError(f"{what} {shown!r} is not an http:// or https:// URL with a host; "
                      "e.g. http://127.0.0.1:8000/v1 (vLLM) or https://api.openai.com/v1")
    return url


def _no_userinfo(url: str) -> str:
    return re.sub(r"//[^/@]*@", "//[redacted]@", url)


@dataclass
class _Tally:
    """What one ``generate_stream`` call has seen so far (updated on the loop thread, read by the caller)."""
    done: int = 0
    retries: int = 0
    failed: int = 0
    streak: int = 0  # server-level failures in a row


class OpenAIChatLLM(LLM):
    kind = "openai"
    supports_scores = False  # chat completions give log-probs only of their own tokens
    streams_requests = True

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 deadline: float | None = None, concurrency: int = 8, breaker: int = BREAKER, client=None):
        super().__init__(model)
        from openai import AsyncOpenAI
        self.base_url = check_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or None)
        if not timeout or timeout <= 0:
            raise CMError(f"timeout must be positive, got {timeout}")
        if max_retries is None or max_retries < 0:
            raise CMError(f"max_retries must be 0 or more, got {max_retries}")
        if deadline is not None and deadline <= 0:
            raise CMError(f"deadline must be positive, got {deadline}")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url:
                key = "EMPTY"  # local servers (vLLM, Ollama) accept any key
            else:
                raise BackendError("no API key: set OPENAI_API_KEY in the environment (or enter it in the demo)")
        self.timeout, self.max_retries = float(timeout), int(max_retries)
        self.deadline = float(deadline) if deadline is not None else DEADLINE_FACTOR * self.timeout
        self.concurrency = max(1, concurrency)
        self.breaker = max(1, breaker)
        self._failures_said = 0
        self._loop = _LoopThread()
        # the retries are ours (max_retries=0 here): every attempt is then bounded, counted and shown
        self.client = client or AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout,
                                            max_retries=0)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "base_url": self.url}

    @property
    def url(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    # ------------------------------------------------------------------ one request

    async def _request(self, req: GenRequest, tally: _Tally) -> list[str]:
        """n texts, or ``[Failed]`` once the retries or the deadline are spent. Raises BackendError only for a
        fault that no retry can mend (HTTP 401/403/404)."""
        state = {"problem": "no reply yet", "attempts": 0, "kind": "server"}
        try:
            return await asyncio.wait_for(self._ask(req, tally, state), self.deadline)
        except asyncio.TimeoutError:
            return [Failed(f"{self.label}: no usable reply from {self.url} within the {self.deadline:g} s deadline "
                           f"({state['attempts']} attempt(s), {self.timeout:g} s each at most; last: "
                           f"{state['problem']})", "server")]

    async def _ask(self, req: GenRequest, tally: _Tally, state: dict) -> list[str]:
        texts: list[str] = []
        fails = 0  # attempts that brought nothing usable
        while len(texts) < req.n:
            state["attempts"] += 1
            problem, kind, wait = await self._attempt(req, texts)
            if problem is None:  # progress (a server may return fewer choices than asked: ask for the rest)
                continue
            state.update(problem=problem, kind=kind)
            fails += 1
            if wait is None or fails > self.max_retries:
                n = state["attempts"]
                return [Failed(f"{self.label}: {problem} ({n} attempt{'s' if n > 1 else ''})", kind)]
            tally.retries += 1
            self.stats.retries += 1
            wait = wait if wait > 0 else _backoff(fails)
            # worded as the openai SDK's own line (its retries are off: these are they)
            log.info("%s: Retrying request in %.2f s (retry %d of %d) after: %s", self.label, wait, fails,
                     self.max_retries, problem)
            await asyncio.sleep(wait)
        return texts[: req.n]

    async def _attempt(self, req: GenRequest, texts: list[str]) -> tuple[str | None, str, float | None]:
        """One round trip; usable texts are appended to ``texts``. Returns (problem or None, kind, wait): wait None
        means do not retry, 0 means back off exponentially, > 0 is the server's Retry-After."""
        import openai
        kw: dict[str, Any] = dict(model=self.model, messages=req.chat(), n=req.n - len(texts),
                                  temperature=req.temperature, max_tokens=req.max_tokens, seed=req.seed)
        if req.top_p < 1.0:
            kw["top_p"] = req.top_p
        try:  # the attempt as a whole is bounded: httpx's timeout applies per read, not to the reply
            resp = await asyncio.wait_for(self.client.chat.completions.create(**kw), self.timeout)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            return f"{self.url} sent no complete reply within the {self.timeout:g} s timeout", "server", 0.0
        except openai.APIConnectionError as e:
            cause = f": {type(e.__cause__).__name__}" if e.__cause__ is not None else ""
            return f"cannot connect to {self.url} ({e.__class__.__name__}{cause})", "server", 0.0
        except openai.APIStatusError as e:
            status = e.status_code
            msg = f"HTTP {status} from {self.url}: {_short(e, getattr(self.client, 'api_key', None))}"
            if status in FATAL_STATUS:
                raise BackendError(f"{self.label}: {msg} ({FATAL_STATUS[status]})") from None
            retry = _should_retry(e.response, status)
            return msg, "server", (_retry_after(e.response) if retry else None)
        except (openai.OpenAIError, ValueError) as e:  # e.g. a 200 reply whose body is cut short
            return f"unusable reply from {self.url} ({type(e).__name__})", "server", 0.0
        if isinstance(resp, (str, bytes)):  # a 200 reply that is not JSON (a proxy's HTML page)
            return f"unusable reply from {self.url} (not JSON)", "server", 0.0
        try:  # a 200 JSON reply need not be a chat completion (another API's JSON)
            choices = list(getattr(resp, "choices", None) or [])
            got = [(c.message.content if c.message is not None else None, c.finish_reason) for c in choices]
        except (AttributeError, TypeError):
            return f"unusable reply from {self.url} (not a chat completion)", "server", 0.0
        usable = [t.strip() for t, _ in got if isinstance(t, str) and t.strip()]
        if usable:
            texts.extend(usable)
            return None, "", None
        if not got:
            return "the server returned no choices", "content", 0.0
        contents = sorted({"null" if t is None else "empty" for t, _ in got})
        reasons = sorted({str(r) for _, r in got if r})
        why = f", finish_reason {'/'.join(reasons)}" if reasons else ""
        return f"the reply had no text (content {'/'.join(contents)}{why})", "content", 0.0

    # ------------------------------------------------------------------ many requests

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        out: list[Any] = [None] * len(requests)
        for i, result in self.generate_stream(requests):
            out[i] = result
        return out

    def generate_stream(self, requests: list[GenRequest]) -> Iterator[tuple[int, list[str]]]:
        """(index, result) as results arrive; ``concurrency`` requests in flight, a new one starting as soon as
        one ends. Raises BackendError (after cancelling the rest) for a fatal fault or a server that looks down."""
        requests = list(requests)
        if not requests:
            return
        self.stats.generate_calls += len(requests)
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        tally = _Tally()
        trip = min(self.breaker, len(requests))

        async def one(i: int, req: GenRequest, gate: asyncio.Semaphore) -> None:
            async with gate:
                result = await self._request(req, tally)
            bad = result[0] if result and isinstance(result[0], Failed) else None
            if bad is None:
                tally.streak = 0
            else:
                tally.failed += 1
                self.stats.failed += 1
                if bad.kind == "server":
                    tally.streak += 1
                    if tally.streak >= trip:
                        raise BackendError(bad.reason if trip == 1 else
                                           f"{bad.reason}; {tally.streak} requests in a row failed, giving up "
                                           f"(is {self.url} up? timeout {self.timeout:g} s, max retries "
                                           f"{self.max_retries}, deadline {self.deadline:g} s)") from None
                self._failures_said += 1
                said = self._failures_said
                log.log(logging.WARNING if said <= WARN_FAILURES else logging.INFO,
                        "%s; not cached, counts as a wrong answer%s", bad.reason,
                        "; further failures are logged with -v" if said == WARN_FAILURES else "")
            tally.done += 1
            arrived.put((i, result))

        async def run_all() -> None:
            gate = asyncio.Semaphore(self.concurrency)  # created inside the loop it guards
            tasks = [asyncio.ensure_future(one(i, r, gate)) for i, r in enumerate(requests)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:  # a fatal fault (or the caller gave up): stop sending the others
                    t.cancel()

        bar = _progress(len(requests), self.label, self.concurrency)
        future = self._loop.submit(run_all())
        received = 0
        try:
            while received < len(requests):
                try:
                    item = arrived.get(timeout=0.2)
                except queue.Empty:
                    if future.done():
                        future.result()  # raises the fatal fault, if that is why it ended
                        if arrived.empty():
                            break
                    self._show(bar, tally)
                    continue
                received += 1
                self._show(bar, tally, advance=True)
                yield item
            future.result()
        finally:
            if not future.done():  # the caller stopped early (an exception, Ctrl-C): cancel what is left
                future.cancel()
            if bar is not None:
                bar.close()

    @staticmethod
    def _show(bar, tally: _Tally, advance: bool = False) -> None:
        if bar is None:
            return
        if advance:
            bar.update(1)
        post = f"retries={tally.retries} failed={tally.failed}"
        if getattr(bar, "_cm_post", None) != post:
            bar._cm_post = post
            bar.set_postfix_str(post)

    def close(self) -> None:
        try:
            self._loop.run(self.client.close())
        except Exception:
            pass
        self._loop.stop()


def _progress(total: int, label: str, concurrency: int):
    """A progress bar over one call's requests (answers, retries, failures), as the methods' own bars: not for a
    call that fits in one window, nor under TQDM_DISABLE=1."""
    if total <= concurrency or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true"):
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=label, leave=False, unit="req")


def _backoff(fails: int) -> float:
    """Exponential back-off as the openai client's: 0.5 s doubling to 8 s, less up to 25 % jitter."""
    return min(0.5 * 2 ** (fails - 1), 8.0) * (1 - 0.25 * random.random())


def _should_retry(response, status: int) -> bool:
    flag = (getattr(response, "headers", None) or {}).get("x-should-retry")
    if flag in ("true", "false"):
        return flag == "true"
    return status in (408, 409, 429) or status >= 500


def _retry_after(response) -> float:
    """The server's Retry-After (retry-after-ms, seconds or an HTTP date) when within a minute; else 0 (back off)."""
    headers = getattr(response, "headers", None) or {}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            delay = float(value) / scale
        except ValueError:
            try:
                delay = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                continue
        if 0 < delay <= MAX_RETRY_AFTER:
            return delay
    return 0.0


class _LoopThread:
    """A private event loop on a daemon thread: the async client's connections stay bound to one loop, and
    ``run`` works from any thread, including one that already runs its own loop (Jupyter, Gradio)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cm-openai-loop", daemon=True)
        self.thread.start()

    def submit(self, coro):
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise BackendError("this OpenAI backend was closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro):
        future = self.submit(coro)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # e.g. Ctrl-C in the caller: do not leave the coroutine running
            raise

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


_KEYLIKE = re.compile(r"\b(sk-[A-Za-z0-9_\-*.]{6,}|Bearer\s+\S+)", re.I)


def _short(e, secret: str | None = None) -> str:
    """The server's message, cut short and with anything key-like masked (401 replies echo part of the key).

    The key itself is masked whatever its shape (a local server's key need not look like ``sk-...``)."""
    text = " ".join(str(getattr(e, "message", "") or e).split())
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)[:300]
