"""Backends by spec string: ``embedded`` (``embedded:bfloat16`` for its bf16 weights), ``openai:MODEL`` (with
optional base_url), ``hf:ID_OR_PATH``."""
from __future__ import annotations

from pathlib import Path

from ..errors import CMError
from .base import LLM, CandidateScore, Failed, GenRequest, ScoreRequest, failure
from .cache import DEFAULT_CACHE_DIR, CachedLLM, ResponseCache
from .openai_backend import check_base_url

__all__ = ["LLM", "CandidateScore", "Failed", "GenRequest", "ScoreRequest", "CachedLLM", "ResponseCache",
           "make_backend", "DEFAULT_CACHE_DIR", "check_base_url", "failure"]


def make_backend(spec: str = "embedded", *, cache_dir: str | Path | None = None, use_cache: bool = True,
                 base_url: str | None = None, api_key: str | None = None, **kw) -> LLM:
    """Build a backend from a spec and wrap it in the persistent response cache."""
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR)
    kind, _, name = spec.partition(":")
    if kind == "embedded":
        from .hf import EmbeddedLLM
        if name not in ("", "float32", "bfloat16"):
            raise CMError(f"unknown embedded dtype {name!r}: use embedded (float32) or embedded:bfloat16")
        # bf16: what the official Llama runs load; on a CPU with AMX it encodes long prompts ~3x faster than fp32
        llm: LLM = EmbeddedLLM(**({"dtype": name} if name else {}), **kw)
    elif kind == "openai":
        if not name:
            raise CMError("openai backend needs a model: openai:gpt-4o-mini")
        from .openai_backend import OpenAIChatLLM
        llm = OpenAIChatLLM(name, base_url=base_url, api_key=api_key, **kw)
    elif kind == "hf":
        if not name:
            raise CMError("hf backend needs a model id or path: hf:meta-llama/Meta-Llama-3-8B-Instruct")
        from .hf import TransformersLLM
        llm = TransformersLLM(name, **kw)
    else:
        raise CMError(f"unknown model spec {spec!r}; use embedded, openai:MODEL or hf:ID")
    return CachedLLM(llm, cache_dir / "responses.sqlite") if use_cache else llm
