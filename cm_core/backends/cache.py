"""A persistent response cache in front of any backend (sqlite, one row per request).

The key hashes the backend's identity (kind, model, revision, dtype...), the operation, the full prompt and
every decoding setting, so two models never share answers; secrets are never part of an identity. Each answer
is committed as soon as it arrives, so an interrupted run resumes where it stopped and a re-run is free.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from .base import LLM, CandidateScore, GenRequest, ScoreRequest

DEFAULT_CACHE_DIR = Path(os.environ.get("CM_CACHE_DIR", Path.home() / ".cache" / "cm-personalize"))


def request_key(identity: dict[str, Any], request: dict[str, Any]) -> str:
    blob = json.dumps({"backend": identity, "request": request}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Thread-safe key -> JSON store in one sqlite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=60)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    def get_many(self, keys: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i:i + 500])
                q = f"SELECT key, value FROM responses WHERE key IN ({','.join('?' * len(chunk))})"
                for k, v in self._db.execute(q, chunk):
                    out[k] = json.loads(v)
        return out

    def put_many(self, items: dict[str, Any]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO responses VALUES (?, ?)",
                                 [(k, json.dumps(v)) for k, v in items.items()])
            self._db.commit()

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class CachedLLM(LLM):
    """Wraps a backend; methods see an ordinary LLM. Misses are computed in chunks and saved per chunk."""

    def __init__(self, inner: LLM, cache: ResponseCache | str | Path, chunk_size: int | None = None):
        super().__init__(inner.model)
        self.inner = inner
        self.cache = cache if isinstance(cache, ResponseCache) else ResponseCache(cache)
        # a chunk is saved as soon as it is done (resume loses at most one chunk) and is sent to the backend at
        # once, so it must be at least as large as the backend's concurrency
        self.chunk_size = chunk_size or max(8, getattr(inner, "concurrency", 8))
        self.kind = inner.kind
        self.supports_scores = inner.supports_scores
        self.stats = inner.stats

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    def _through(self, requests: list, compute: Callable[[list], list], encode, decode) -> list:
        ident = self.identity()
        keys = [request_key(ident, r.key()) for r in requests]
        found = self.cache.get_many(keys)
        self.stats.cache_hits += sum(1 for k in keys if k in found)
        missing = [i for i, k in enumerate(keys) if k not in found]
        # the same request twice in one batch is computed once
        todo: dict[str, int] = {}
        for i in missing:
            todo.setdefault(keys[i], i)
        pending = list(todo.items())
        for start in range(0, len(pending), self.chunk_size):
            chunk = pending[start:start + self.chunk_size]
            results = compute([requests[i] for _, i in chunk])
            fresh = {k: encode(res) for (k, _), res in zip(chunk, results)}
            self.cache.put_many(fresh)
            found.update(fresh)
        return [decode(found[k]) for k in keys]

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        return self._through(requests, self.inner.generate, lambda r: list(r), lambda v: list(v))

    def score(self, requests: list[ScoreRequest]) -> list[list[CandidateScore]]:
        return self._through(requests, self.inner.score,
                             lambda r: [[s.logprob, s.n_tokens] for s in r],
                             lambda v: [CandidateScore(lp, n) for lp, n in v])

    def close(self) -> None:
        self.inner.close()
        self.cache.close()
