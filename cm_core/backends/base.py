"""The LLM interface every method talks to: two batched primitives, nothing else.

- ``generate``: chat messages -> n sampled completions.
- ``score``: chat messages + a fixed list of candidate responses -> each candidate's summed token
  log-probability as the assistant's reply, and its token count (for length normalization).

Methods never know which backend they run on; a backend without log-probabilities sets
``supports_scores = False`` and methods fall back to constrained choice by generation.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

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


@dataclass
class CallStats:
    generate_calls: int = 0
    score_calls: int = 0
    cache_hits: int = 0
    extra: dict = field(default_factory=dict)


class LLM(ABC):
    """Base class of backends. ``identity()`` must name everything that changes answers and no secret."""

    supports_scores: bool = False
    kind: str = "abstract"

    def __init__(self, model: str):
        self.model = model
        self.stats = CallStats()

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model}

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.model}"

    @abstractmethod
    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        ...

    def score(self, requests: list[ScoreRequest]) -> list[list[CandidateScore]]:
        raise NotImplementedError(f"{self.label} gives no log-probabilities; use constrained generation")

    def close(self) -> None:
        pass
