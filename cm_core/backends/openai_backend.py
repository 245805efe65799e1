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

Scoring. Chat completions give log-probabilities only of the model's own tokens, which cannot score a label it did
not write. Servers that also score a prompt's tokens (llama.cpp's ``llama-cpp-python`` server and vLLM: the
completions endpoint with ``echo`` + ``logprobs``, or vLLM's ``prompt_logprobs``) can: each candidate is sent as the
assistant's reply after the chat-templated prompt, and its score is the sum of the log-probabilities of its tokens
and of the end-of-turn token after them, as the in-process backend computes it (same length normalization and
calibration downstream). The completions endpoint takes raw text, so the chat template is rendered here
(``chat_template``: ``chatml``, ``llama3`` or a Jinja file; by default each built-in one is tried) and checked
against the server's own chat template by their prompt token counts. What the server offers is detected once per
backend, lazily (the first time ``supports_scores`` is read or a score is asked, never at construction); without
it, ``supports_scores`` is False and methods fall back to generation, and ``scoring_note`` says why.
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import math
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
from .base import LLM, CandidateScore, Failed, GenRequest, ScoreRequest, failure

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
    streams_requests = True

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_retries: int = DEFAULT_MAX_RETRIES,
                 deadline: float | None = None, concurrency: int = 8, breaker: int = BREAKER, client=None,
                 chat_template: str | None = None, scoring: str = "auto"):
        super().__init__(model)
        from openai import AsyncOpenAI
        self.base_url = check_base_url(base_url or os.environ.get("OPENAI_BASE_URL") or None)
        if not timeout or timeout <= 0:
            raise CMError(f"timeout must be positive, got {timeout}")
        if max_retries is None or max_retries < 0:
            raise CMError(f"max_retries must be 0 or more, got {max_retries}")
        if deadline is not None and deadline <= 0:
            raise CMError(f"deadline must be positive, got {deadline}")
        if scoring not in SCORING_CHOICES:
            raise CMError(f"scoring must be one of {', '.join(SCORING_CHOICES)}, got {scoring!r}")
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
        # checked now (a bad name or an unreadable file is a flag error), used once the server was asked
        self.chat_template = load_template(chat_template) if chat_template else None
        self.scoring_choice = scoring
        self._scorer: _Scorer | None = None
        self._detected = False
        self._detect_lock = threading.Lock()
        self.scoring_note = ""  # how scores are computed, or why they cannot be (set by the detection)
        self._failures_said = 0
        self._loop = _LoopThread()
        # the retries are ours (max_retries=0 here): every attempt is then bounded, counted and shown
        self.client = client or AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout,
                                            max_retries=0)

    def identity(self) -> dict[str, Any]:
        # What the server offers for scoring is detected, not configured, so it is not part of the identity: the
        # scores it gives are those of the served model (base_url + model) whichever endpoint returned them, and a
        # chat template is used only once the server's own was checked to render the same prompt.
        return {"kind": self.kind, "model": self.model, "base_url": self.url}

    @property
    def url(self) -> str:
        return self.base_url or "https://api.openai.com/v1"

    # ------------------------------------------------------------------ what the server offers

    @property
    def supports_scores(self) -> bool:
        """Whether this server scores a prompt's tokens (detected once, on first use: this asks the server)."""
        return self._scoring() is not None

    @property
    def scoring(self) -> str:
        """How candidates are scored: ``completions-echo``, ``completions-prompt-logprobs`` or ``none``."""
        scorer = self._scoring()
        return scorer.name if scorer is not None else "none"

    def _scoring(self) -> "_Scorer | None":
        if not self._detected:
            with self._detect_lock:
                if not self._detected:
                    if self.scoring_choice == "off":
                        scorer, note = None, "scoring through the server was turned off (scoring='off')"
                    else:
                        scorer, note = self._loop.run(self._detect())
                    self._scorer, self.scoring_note = scorer, note
                    self.stats.extra["scoring"] = scorer.name if scorer is not None else "generation-fallback"
                    if scorer is not None:
                        log.info("%s: %s", self.label, note)
                    self._detected = True
        return self._scorer

    async def _detect(self) -> tuple["_Scorer | None", str]:
        """(scorer, note) or (None, why not): one probe per way of scoring, then the chat template is checked."""
        templates = [self.chat_template] if self.chat_template else [BUILTIN_TEMPLATES[n] for n in AUTO_TEMPLATES]
        first = templates[0]
        probe_prompt, probe_span = first.scoring_prompt(PROBE_MESSAGES, PROBE_ANSWER)
        problems = []
        mode = None
        for candidate_mode in ("echo", "prompt_logprobs"):
            # echo: the top token at each position too, to tell whether the log-probabilities are one token off
            body = _completion_body(self.model, candidate_mode, [probe_prompt], top=int(candidate_mode == "echo"))
            resp, problem = await self._probe("completions", body)
            if resp is not None:
                try:
                    scores = _read_scores(resp, candidate_mode, [probe_span])
                    if candidate_mode == "echo" and _echo_shifted(resp):
                        problem = ("its echoed log-probabilities are one token off (each is that of the next token: "
                                   "llama-cpp-python does this for a prompt that does not start with the model's BOS "
                                   "token)")
                    elif scores and math.isfinite(scores[0].logprob) and scores[0].n_tokens > 0:
                        mode = candidate_mode
                        break
                    else:
                        problem = "no usable log-probabilities"
                except _Unreadable as e:
                    problem = str(e)
            problems.append(f"{SCORING_NAMES[candidate_mode]}: {problem}")
            if resp is None and not re.match(r"HTTP 4(?!04)", problem or ""):
                break  # no completions endpoint (404), or the server failed: no point asking it the other way
        if mode is None:
            return None, (f"the server scores no prompt tokens: {'; '.join(problems)}; a label it did not write "
                          "cannot be scored")
        template, why = await self._check_template(templates)
        if template is None:
            return None, why
        # several prompts in one request (vLLM): one request per query instead of one per candidate
        batched = False
        second = template.scoring_prompt(PROBE_MESSAGES, PROBE_OTHER)
        body = _completion_body(self.model, mode, [probe_prompt, second[0]])
        resp, _ = await self._probe("completions", body)
        if resp is not None:
            try:
                batched = len(_read_scores(resp, mode, [probe_span, second[1]])) == 2
            except _Unreadable:
                batched = False
        scorer = _Scorer(mode, template, batched)
        return scorer, (f"labels are scored with the server's token log-probabilities ({SCORING_NAMES[mode]}, "
                        f"{template.name} chat template{why}, {'several prompts' if batched else 'one prompt'} "
                        "per request)")

    async def _check_template(self, templates: list["ChatTemplate"]) -> tuple["ChatTemplate | None", str]:
        """The first template whose prompt the server counts as as many tokens as its own chat prompt."""
        kw = dict(model=self.model, messages=PROBE_MESSAGES, max_tokens=1, temperature=0.0)
        resp, problem = await self._probe("chat", kw)
        served = _prompt_tokens(resp)
        if served is None:
            if self.chat_template is not None:  # the user's word, which nothing here can check
                return self.chat_template, " (as given; the server reports no token counts to check it)"
            why = problem or "the server reports no token counts"
            return None, (f"the server's chat template is unknown ({why}): pass --chat-template (chatml, llama3 "
                          "or a Jinja file) to score through its completions endpoint")
        counts = []
        for t in templates:
            resp, problem = await self._probe("completions", dict(model=self.model, prompt=t.render(PROBE_MESSAGES),
                                                                  max_tokens=1, temperature=0.0))
            n = _prompt_tokens(resp)
            counts.append(f"{t.name}: {n if n is not None else problem}")
            if n == served:
                return t, ", checked against the server's"
        return None, (f"no chat template renders the server's chat prompt ({served} tokens; {', '.join(counts)}): "
                      "pass --chat-template with the served model's template (chatml, llama3 or a Jinja file)")

    async def _probe(self, endpoint: str, kw: dict) -> tuple[Any, str | None]:
        """One probe request (retried once after a transient fault): (reply, None) or (None, problem). A bad key
        stops at once (BackendError), as any request would."""
        make = ((lambda: self.client.completions.create(**kw)) if endpoint == "completions"
                else (lambda: self.client.chat.completions.create(**kw)))
        problem = None
        for attempt in range(2):
            resp, problem, _, wait = await self._round_trip(make, fatal=(401, 403))
            if resp is not None:
                return resp, None
            if wait is None or attempt:
                break
            await asyncio.sleep(wait if wait > 0 else _backoff(1))
        return None, problem

    # ------------------------------------------------------------------ one request

    async def _round_trip(self, make, fatal=tuple(FATAL_STATUS)) -> tuple[Any, str | None, str, float | None]:
        """One bounded round trip: (reply, None, "", None) or (None, problem, kind, wait). wait None: do not retry;
        0: back off exponentially; > 0: the server's Retry-After. Statuses in ``fatal`` raise BackendError."""
        import openai
        try:  # the attempt as a whole is bounded: httpx's timeout applies per read, not to the reply
            resp = await asyncio.wait_for(make(), self.timeout)
        except (asyncio.TimeoutError, openai.APITimeoutError):
            return None, f"{self.url} sent no complete reply within the {self.timeout:g} s timeout", "server", 0.0
        except openai.APIConnectionError as e:
            cause = f": {type(e.__cause__).__name__}" if e.__cause__ is not None else ""
            return None, f"cannot connect to {self.url} ({e.__class__.__name__}{cause})", "server", 0.0
        except openai.APIStatusError as e:
            status = e.status_code
            msg = f"HTTP {status} from {self.url}: {_short(e, getattr(self.client, 'api_key', None))}"
            if status in fatal and status in FATAL_STATUS:
                raise BackendError(f"{self.label}: {msg} ({FATAL_STATUS[status]})") from None
            retry = _should_retry(e.response, status)
            return None, msg, "server", (_retry_after(e.response) if retry else None)
        except (openai.OpenAIError, ValueError) as e:  # e.g. a 200 reply whose body is cut short
            return None, f"unusable reply from {self.url} ({type(e).__name__})", "server", 0.0
        if isinstance(resp, (str, bytes)):  # a 200 reply that is not JSON (a proxy's HTML page)
            return None, f"unusable reply from {self.url} (not JSON)", "server", 0.0
        return resp, None, "", None

    async def _retrying(self, attempt, tally: _Tally) -> list:
        """Run ``attempt`` until it returns a result, within ``max_retries`` failed attempts and the deadline;
        else ``[Failed]``. ``attempt()`` returns (result or None, problem or None, kind, wait): no result and no
        problem means progress (ask again at once)."""
        state = {"problem": "no reply yet", "attempts": 0, "kind": "server"}

        async def go() -> list:
            fails = 0  # attempts that brought nothing usable
            while True:
                state["attempts"] += 1
                result, problem, kind, wait = await attempt()
                if result is not None:
                    return result
                if problem is None:
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

        try:
            return await asyncio.wait_for(go(), self.deadline)
        except asyncio.TimeoutError:
            return [Failed(f"{self.label}: no usable reply from {self.url} within the {self.deadline:g} s deadline "
                           f"({state['attempts']} attempt(s), {self.timeout:g} s each at most; last: "
                           f"{state['problem']})", "server")]

    async def _request(self, req: GenRequest, tally: _Tally) -> list[str]:
        """n texts, or ``[Failed]`` once the retries or the deadline are spent. Raises BackendError only for a
        fault that no retry can mend (HTTP 401/403/404)."""
        texts: list[str] = []

        async def attempt():
            problem, kind, wait = await self._attempt(req, texts)
            if problem is None and len(texts) >= req.n:
                return texts[: req.n], None, "", None
            return None, problem, kind, wait  # problem None: progress (a server returned fewer choices: ask again)

        return await self._retrying(attempt, tally)

    async def _attempt(self, req: GenRequest, texts: list[str]) -> tuple[str | None, str, float | None]:
        """One round trip; usable texts are appended to ``texts``. Returns (problem or None, kind, wait)."""
        # A server that ignores ``n`` (llama.cpp's) returns one choice: the rest is asked again, each time with
        # another seed, so the votes are samples and not one answer repeated (deterministic all the same: vote k
        # is asked with seed + k)
        kw: dict[str, Any] = dict(model=self.model, messages=req.chat(), n=req.n - len(texts),
                                  temperature=req.temperature, max_tokens=req.max_tokens,
                                  seed=req.seed + len(texts) if req.temperature > 0 else req.seed)
        if req.top_p < 1.0:
            kw["top_p"] = req.top_p
        resp, problem, kind, wait = await self._round_trip(lambda: self.client.chat.completions.create(**kw))
        if resp is None:
            return problem, kind, wait
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

    async def _score_job(self, job: "_ScoreJob", tally: _Tally) -> list:
        """The scores of one request's prompts (one or several candidates), or ``[Failed]``."""
        scorer = self._scorer
        body = _completion_body(self.model, scorer.mode, job.prompts)

        async def attempt():
            resp, problem, kind, wait = await self._round_trip(lambda: self.client.completions.create(**body))
            if resp is None:
                return None, problem, kind, wait
            try:
                return _read_scores(resp, scorer.mode, job.spans), None, "", None
            except _Unreadable as e:
                return None, f"unusable log-probabilities from {self.url} ({e})", "content", 0.0

        return await self._retrying(attempt, tally)

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
        yield from self._stream(requests, self._request)

    def score(self, requests: list[ScoreRequest]) -> list[list[CandidateScore]]:
        """Each candidate's summed log-probability (its tokens and the end of turn) as the assistant's reply, from
        the server's prompt log-probabilities; ``[Failed]`` for a request the server could not score."""
        requests = list(requests)
        scorer = self._scoring()
        if scorer is None:
            raise NotImplementedError(f"{self.label} gives no log-probabilities ({self.scoring_note}); "
                                      "use constrained generation")
        if not requests:
            return []
        self.stats.score_calls += len(requests)
        jobs: list[_ScoreJob] = []
        for i, req in enumerate(requests):
            made = [scorer.template.scoring_prompt(req.chat(), c) for c in req.candidates]
            step = SCORE_BATCH if scorer.batched else 1
            for j in range(0, len(made), step):
                part = made[j:j + step]
                jobs.append(_ScoreJob(i, j, [p for p, _ in part], [s for _, s in part]))
        out: list[list[Any]] = [[None] * len(r.candidates) for r in requests]
        bad: dict[int, Failed] = {}
        for k, result in self._stream(jobs, self._score_job, count_failed=False):
            job = jobs[k]
            failed = failure(result)
            if failed is not None:
                bad.setdefault(job.request, failed)
            else:
                out[job.request][job.start:job.start + len(result)] = result
        for i, failed in bad.items():
            out[i] = [failed]  # one candidate without a score: the query cannot be answered
        self.stats.failed += len(bad)
        return out

    def _stream(self, items: list, run, count_failed: bool = True) -> Iterator[tuple[int, list]]:
        """(index, result) of ``run(item, tally)`` for every item as results arrive, ``concurrency`` in flight."""
        arrived: queue.SimpleQueue = queue.SimpleQueue()
        tally = _Tally()
        trip = min(self.breaker, len(items))

        async def one(i: int, item, gate: asyncio.Semaphore) -> None:
            async with gate:
                result = await run(item, tally)
            bad = result[0] if result and isinstance(result[0], Failed) else None
            if bad is None:
                tally.streak = 0
            else:
                tally.failed += 1
                if count_failed:
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
            tasks = [asyncio.ensure_future(one(i, r, gate)) for i, r in enumerate(items)]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:  # a fatal fault (or the caller gave up): stop sending the others
                    t.cancel()

        bar = _progress(len(items), self.label, self.concurrency)
        future = self._loop.submit(run_all())
        received = 0
        try:
            while received < len(items):
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


# --------------------------------------------------------------------------- scoring through the server

SCORING_CHOICES = ("auto", "off")
SCORING_NAMES = {"echo": "completions-echo", "prompt_logprobs": "completions-prompt-logprobs"}
SCORE_BATCH = 64  # candidates per request, where the server takes several prompts at once
PROBE_MESSAGES = [{"role": "system", "content": "You label queries. Answer with the label only."},
                  {"role": "user", "content": "Query: wake me up at seven\nLabel:"}]
PROBE_ANSWER, PROBE_OTHER = "alarm", "weather report"


@dataclass(frozen=True)
class _Span:
    """What ends a scoring prompt: the candidate, then the end-of-turn text (whose first token is scored too)."""
    candidate: str
    end: str


@dataclass(frozen=True)
class _Scorer:
    mode: str  # "echo" or "prompt_logprobs"
    template: "ChatTemplate"
    batched: bool  # the server takes a list of prompts in one request

    @property
    def name(self) -> str:
        return SCORING_NAMES[self.mode]


@dataclass(frozen=True)
class _ScoreJob:
    request: int  # index of the ScoreRequest
    start: int  # index of its first candidate in this job
    prompts: list
    spans: list


class _Unreadable(ValueError):
    """A completions reply whose log-probabilities cannot be matched to the candidate's tokens."""


class ChatTemplate:
    """Renders chat messages as the served model's prompt text (the completions endpoint takes raw text).

    ``scoring_prompt(messages, candidate)`` is the generation prompt, the candidate as the assistant's reply and
    the end-of-turn text, as the in-process backend scores it (candidate tokens + the end-of-turn token)."""

    def __init__(self, name: str, render, end_of_turn: str | None = None):
        self.name, self._render, self._end = name, render, end_of_turn

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._render([{"role": m["role"], "content": m["content"]} for m in messages], add_generation_prompt)

    def scoring_prompt(self, messages: list[dict], candidate: str) -> tuple[str, _Span]:
        prompt = self.render(messages, True)
        end = self._end
        if end is None:  # a Jinja template: what follows the reply when the conversation is rendered with it
            full = self.render(list(messages) + [{"role": "assistant", "content": candidate}], False)
            end = full[len(prompt) + len(candidate):] if full.startswith(prompt + candidate) else ""
        return prompt + candidate + end, _Span(candidate, end)

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


def _chatml(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama3(messages, add_generation_prompt):
    # the leading <|begin_of_text|> is left to the server, which adds it to every completions prompt
    text = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                   for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


BUILTIN_TEMPLATES = {"chatml": ChatTemplate("chatml", _chatml, "<|im_end|>"),
                     "llama3": ChatTemplate("llama3", _llama3, "<|eot_id|>")}
AUTO_TEMPLATES = ("chatml", "llama3")  # tried in turn when none is given


def load_template(spec: str) -> ChatTemplate:
    """A built-in template by name (chatml, llama3), or a Jinja chat template (a file, or its text)."""
    spec = str(spec).strip()
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = os.path.expanduser(spec)
    if "{" not in spec and not os.path.isfile(path):
        raise CMError(f"unknown chat template {spec!r}: use {', '.join(BUILTIN_TEMPLATES)} or a Jinja template file")
    text = open(path, encoding="utf-8").read() if os.path.isfile(path) else spec
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise CMError("a Jinja chat template needs the jinja2 package (pip install jinja2)") from None

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders them
    env.globals["raise_exception"] = raise_exception
    try:
        compiled = env.from_string(text)
    except TemplateError as e:
        raise CMError(f"chat template {spec[:80]!r} is not valid Jinja ({e})") from None

    def render(messages, add_generation_prompt):
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token="",
                               eos_token="")

    return ChatTemplate(os.path.basename(path) if os.path.isfile(path) else "jinja", render)


def _completion_body(model: str, mode: str, prompts: list[str], top: int = 0) -> dict:
    """A completions request that returns the prompt's token log-probabilities (and the ``top`` likeliest tokens
    at each position) and generates one token."""
    body: dict[str, Any] = dict(model=model, prompt=prompts if len(prompts) > 1 else prompts[0], max_tokens=1,
                                temperature=0.0)
    if mode == "echo":
        body.update(echo=True, logprobs=top)
    else:  # vLLM's extension: the prompt's log-probabilities without echoing it
        body["extra_body"] = {"prompt_logprobs": top}
    return body


def _echo_shifted(resp) -> bool:
    """Whether an echo's log-probabilities are each that of the NEXT token: its likeliest token at a position then
    matches the token that follows more often than the token there (llama-cpp-python, when the prompt does not
    start with the model's BOS token). Read from the probe's top-1 tokens."""
    lp = (_as_dict(resp).get("choices") or [{}])[0].get("logprobs") or {}
    tokens, tops = lp.get("tokens") or [], lp.get("top_logprobs") or []
    here = following = 0
    for k in range(1, min(len(tokens), len(tops)) - 1):
        top = tops[k]
        if not isinstance(top, dict) or not top:
            continue
        best = max(top, key=lambda t: top[t] if isinstance(top[t], (int, float)) else -math.inf)
        here += best == tokens[k]
        following += best == tokens[k + 1]
    return following > here


def _prompt_tokens(resp) -> int | None:
    n = getattr(getattr(resp, "usage", None), "prompt_tokens", None)
    return n if isinstance(n, int) and n > 0 else None


def _as_dict(resp) -> dict:
    if isinstance(resp, dict):
        return resp
    if hasattr(resp, "model_dump"):
        return resp.model_dump()
    raise _Unreadable("not a completion")


def _read_scores(resp, mode: str, spans: list[_Span]) -> list[CandidateScore]:
    """Each prompt's candidate score from a completions reply (one choice per prompt, in ``index`` order)."""
    data = _as_dict(resp)
    choices = data.get("choices")
    if not isinstance(choices, list) or len(choices) != len(spans):
        got = len(choices) if isinstance(choices, list) else "no"
        raise _Unreadable(f"{got} choices for {len(spans)} prompt(s)")
    choices = sorted(choices, key=lambda c: (c or {}).get("index") or 0)
    out = []
    for choice, span in zip(choices, spans):
        texts, values = _token_logprobs(choice or {}, mode)
        out.append(_candidate_score(texts, values, span))
    return out


def _token_logprobs(choice: dict, mode: str) -> tuple[list[str], list]:
    """(token texts, their log-probabilities) of the prompt (echo: followed by the generated token, if any)."""
    if mode == "echo":
        lp = choice.get("logprobs") or {}
        texts, values = lp.get("tokens"), lp.get("token_logprobs")
        if not isinstance(texts, list) or not isinstance(values, list) or len(texts) != len(values) or not texts:
            raise _Unreadable("no echoed token log-probabilities")
        return [t if isinstance(t, str) else "" for t in texts], values
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list) or not entries:
        raise _Unreadable("no prompt_logprobs")
    texts, values = [], []
    for entry in entries:
        if not isinstance(entry, dict) or len(entry) != 1:  # the first token has none; each other one: itself
            texts.append("")
            values.append(None)
            continue
        (info,) = entry.values()
        info = info if isinstance(info, dict) else {}
        texts.append(info.get("decoded_token") or "")
        values.append(info.get("logprob"))
    return texts, values


def _candidate_score(texts: list[str], values: list, span: _Span) -> CandidateScore:
    """The candidate's tokens are found by their text at the end of the prompt: the last place where the
    candidate is followed by the end-of-turn token (servers show a special token as its text, or as nothing).
    Its score sums their log-probabilities and that of the end-of-turn token, as the in-process backend does."""
    starts, pos = [], 0
    for t in texts:
        starts.append(pos)
        pos += len(t)
    joined = "".join(texts)
    cand = span.candidate
    end_first = None
    search_to = len(joined)
    while True:
        at = joined.rfind(cand, 0, search_to)
        if at < 0 or not cand:
            raise _Unreadable(f"the candidate {cand[:40]!r} is not among the prompt's tokens")
        lo, hi = at, at + len(cand)
        inside = [k for k, t in enumerate(texts) if t and starts[k] < hi and starts[k] + len(t) > lo]
        nxt = inside[-1] + 1 if inside else None
        if not span.end:
            end_first = None
            break
        if nxt is not None and nxt < len(texts):
            follow = texts[nxt]
            if follow == "" or span.end.startswith(follow) or follow.startswith(span.end):
                end_first = nxt
                break
        search_to = at + len(cand) - 1  # an earlier occurrence (the candidate listed in the prompt) is not it
        if search_to < 0:
            raise _Unreadable(f"the candidate {cand[:40]!r} is not followed by the end of turn")
    picked = inside + ([end_first] if end_first is not None else [])
    vals = [values[k] for k in picked]
    if not picked or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in vals):
        raise _Unreadable(f"missing log-probabilities for the candidate {cand[:40]!r}")
    return CandidateScore(float(sum(vals)), len(picked))
