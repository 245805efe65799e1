"""OpenAI chat models and any OpenAI-compatible server (vLLM, Ollama, llama.cpp server) via ``base_url``.

The key comes from the environment (``OPENAI_API_KEY``) or the caller (the demo's key field); it is held by the
client only, never part of the identity, the cache key, a log line or an exception message. Requests are sent
with ``AsyncOpenAI`` under a semaphore (bounded concurrency) on the backend's own event-loop thread, so callers stay
synchronous and it works the same inside Jupyter or Gradio, whose threads may already run a loop; the ``openai``
client retries 429/5xx/timeouts with exponential back-off (and honours Retry-After).
"""
from __future__ import annotations

import asyncio
import os
import re
import threading
from typing import Any

from ..errors import BackendError
from .base import LLM, GenRequest


class OpenAIChatLLM(LLM):
    kind = "openai"
    supports_scores = False  # chat completions give log-probs only of their own tokens

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 60.0, max_retries: int = 4, concurrency: int = 8, client=None):
        super().__init__(model)
        from openai import AsyncOpenAI
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL")
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if self.base_url:
                key = "EMPTY"  # local servers (vLLM, Ollama) accept any key
            else:
                raise BackendError("no API key: set OPENAI_API_KEY in the environment (or enter it in the demo)")
        self.concurrency = max(1, concurrency)
        self._loop = _LoopThread()
        self.client = client or AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=timeout,
                                            max_retries=max_retries)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "base_url": self.base_url or "https://api.openai.com/v1"}

    async def _one(self, req: GenRequest, gate: asyncio.Semaphore) -> list[str]:
        async with gate:
            return await self._ask(req)

    async def _ask(self, req: GenRequest) -> list[str]:
        import openai
        texts: list[str] = []
        attempts = 0
        problem = "the server returned no choices"
        while len(texts) < req.n:
            attempts += 1
            if attempts > req.n + 2:  # bounded: a reply without (usable) choices is asked again a few times only
                raise BackendError(f"{self.label}: {problem}")
            kw: dict[str, Any] = dict(model=self.model, messages=req.chat(), n=req.n - len(texts),
                                      temperature=req.temperature, max_tokens=req.max_tokens, seed=req.seed)
            if req.top_p < 1.0:
                kw["top_p"] = req.top_p
            try:
                resp = await self.client.chat.completions.create(**kw)
            except openai.APITimeoutError:
                raise BackendError(f"{self.label}: request timed out after retries") from None
            except openai.APIConnectionError as e:
                cause = f": {type(e.__cause__).__name__}" if e.__cause__ is not None else ""
                raise BackendError(f"{self.label}: cannot connect to {self.identity()['base_url']} "
                                   f"({e.__class__.__name__}{cause})") from None
            except openai.APIStatusError as e:
                raise BackendError(f"{self.label}: HTTP {e.status_code} from the server: "
                                   f"{_short(e, getattr(self.client, 'api_key', None))}") from None
            except (openai.OpenAIError, ValueError) as e:  # e.g. a 200 reply whose body is cut short: ask again
                problem = f"unusable reply from the server ({type(e).__name__})"
                continue
            if isinstance(resp, (str, bytes)):  # a 200 reply that is not JSON (a proxy's HTML page): ask again
                problem = "unusable reply from the server (not JSON)"
                continue
            try:  # a 200 JSON reply need not be a chat completion (another API's JSON)
                choices = getattr(resp, "choices", None) or []
                texts.extend((c.message.content or "").strip() for c in choices if c.message is not None)
            except (AttributeError, TypeError):
                problem = "unusable reply from the server (not a chat completion)"
        return texts[: req.n]

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        self.stats.generate_calls += len(requests)

        async def run_all():
            gate = asyncio.Semaphore(self.concurrency)  # created inside the loop it guards
            tasks = [asyncio.ensure_future(self._one(r, gate)) for r in requests]
            try:
                return await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:  # one request failed for good: stop sending the others
                    t.cancel()
                raise

        return list(self._loop.run(run_all()))

    def close(self) -> None:
        try:
            self._loop.run(self.client.close())
        except Exception:
            pass
        self._loop.stop()


class _LoopThread:
    """A private event loop on a daemon thread: the async client's connections stay bound to one loop, and
    ``run`` works from any thread, including one that already runs its own loop (Jupyter, Gradio)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="cm-openai-loop", daemon=True)
        self.thread.start()

    def run(self, coro):
        if self.loop.is_closed() or not self.thread.is_alive():
            coro.close()
            raise BackendError("this OpenAI backend was closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

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
    text = str(getattr(e, "message", "") or e)
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)[:300]
