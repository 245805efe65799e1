"""The LLM interface every method talks to: two batched primitives, nothing else.

- ``generate``: chat messages -> n sampled completions.
- ``score``: chat messages + a fixed list of candidate responses -> each candidate's summed token
  log-probability as the assistant's reply, and its token count (for length normalization).

Methods never know which backend they run on; a backend without log-probabilities sets
``supports_scores = False`` and methods fall back to constrained choice by generation.

A request that fails for good (a remote backend's retries are spent, or its replies carry no text) is answered
with :class:`Failed` in place of a text: an empty answer to code that only reads text (it matches no label, so it
counts as a wrong answer), and recognizable to code that checks (the response cache never stores it, so a re-run
asks again; the memory bank skips it). ``CallStats.failed`` counts them.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}


@dataclass(frozen=True)
class GenRequest:
    messages: tuple  # tuple of (role, content) pairs: hashable, JSON-able
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 60
    seed: int = 0

    @staticmethod
    def of(messages: list[Message], **kw) -> "GenRequest":
        return GenRequest(tuple((m["role"], m["content"]) for m in messages), **kw)

    def chat(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def key(self) -> dict[str, Any]:
        return {"op": "generate", **asdict(self)}


@dataclass(frozen=True)
class ScoreRequest:
    messages: tuple
    candidates: tuple  # candidate replies, scored as the assistant's answer

    @staticmethod
    def of(messages: list[Message], candidates) -> "ScoreRequest":
        return ScoreRequest(tuple((m["role"], m["content"]) for m in messages), tuple(candidates))

    def chat(self) -> list[Message]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def key(self) -> dict[str, Any]:
        return {"op": "score", **asdict(self)}


@dataclass(frozen=True)
class CandidateScore:
    logprob: float  # sum of token log-probabilities of the candidate
    n_tokens: int

    @property
    def mean(self) -> float:
        return self.logprob / max(1, self.n_tokens)


class Failed(str):
    """A request's answer when the request failed for good: the empty text, carrying why (``reason``, one line
    naming the backend) and whether the server looked down (``kind="server"``: timeouts, refused connections, 5xx,
    garbled bodies) or the reply merely had no text (``kind="content"``: null or empty content, no choices)."""

    def __new__(cls, reason: str, kind: str = "server") -> "Failed":
        self = super().__new__(cls, "")
        self.reason, self.kind = reason, kind
        return self

    def __repr__(self) -> str:
        return f"Failed({self.reason!r})"

    def __reduce__(self):
        return (Failed, (self.reason, self.kind))


def failure(result) -> Failed | None:
    """The :class:`Failed` marker in one request's result (a list of texts), or None for a real answer."""
    if isinstance(result, (list, tuple)):
        return next((t for t in result if isinstance(t, Failed)), None)
    return result if isinstance(result, Failed) else None


@dataclass
class CallStats:
    generate_calls: int = 0  # requests sent to the backend (cache misses), re-asks included
    score_calls: int = 0
    cache_hits: int = 0
    failed: int = 0  # requests answered with Failed (never cached: a re-run asks them again)
    retries: int = 0  # extra attempts a remote backend made (faults, timeouts, unusable replies)
    extra: dict = field(default_factory=dict)

    @property
    def queries(self) -> int:
        """Every request answered: from the cache or the backend."""
        return self.generate_calls + self.score_calls + self.cache_hits


class LLM(ABC):
    """Base class of backends. ``identity()`` must name everything that changes answers and no secret."""

    supports_scores: bool = False
    # how ``score`` gets its log-probabilities, or why it cannot (a served model's backend says after detecting)
    scoring_note: str = ""
    # True: ``generate_stream`` keeps a sliding window of requests in flight over the whole list it is given, so
    # callers should hand it every request at once (one slow request then delays only itself) and save each
    # answer as it arrives
    streams_requests: bool = False
    kind: str = "abstract"

    def __init__(self, model: str):
        self.model = model
        self.stats = CallStats()
        self._warned: set[str] = set()

    def warn_once(self, logger: logging.Logger, msg: str, *args) -> None:
        """Log a warning about this backend once, however many methods (each with its own chooser) run on it."""
        if msg not in self._warned:
            self._warned.add(msg)
            logger.warning(msg, *args)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model}

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.model}"

    @abstractmethod
    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        """n texts per request, in request order; ``[Failed(...)]`` for a request that failed for good."""

    def generate_stream(self, requests: list[GenRequest]) -> Iterator[tuple[int, list[str]]]:
        """``(index, result)`` for every request, as results arrive (any order). Default: ``generate``, in order."""
        yield from enumerate(self.generate(requests))

    def score(self, requests: list[ScoreRequest]) -> list[list[CandidateScore]]:
        raise NotImplementedError(f"{self.label} gives no log-probabilities; use constrained generation")

    def close(self) -> None:
        pass
