"""A persistent response cache in front of any backend (sqlite, one row per request).

The key hashes the backend's identity (kind, model, revision, dtype...), the operation, the full prompt and
every decoding setting, so two models never share answers; secrets are never part of an identity. Answers are
committed as they arrive (each one, from a backend that streams its requests; otherwise chunk by chunk), so an
interrupted run resumes where it stopped and a re-run is free. A request that failed for good (``Failed``) is
never stored: a re-run asks it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from .base import LLM, CandidateScore, GenRequest, ScoreRequest, failure

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
        # WAL + NORMAL: a commit survives the process being killed (not a power cut) without an fsync per answer
        self._db.execute("PRAGMA synchronous=NORMAL")
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
        """Close the file (idempotent); the last connection to close removes sqlite's -wal and -shm files."""
        with self._lock:
            self._db.close()


class CachedLLM(LLM):
    """Wraps a backend; methods see an ordinary LLM. Misses go to a streaming backend all at once and each answer
    is saved as it arrives; other backends get them in chunks, saved per chunk."""

    def __init__(self, inner: LLM, cache: ResponseCache | str | Path, chunk_size: int | None = None):
        super().__init__(inner.model)
        self.inner = inner
        self.cache = cache if isinstance(cache, ResponseCache) else ResponseCache(cache)
        # a chunk is saved as soon as it is done (resume loses at most one chunk) and is sent to the backend at
        # once, so it must be at least as large as the backend's concurrency
        self.chunk_size = chunk_size or max(8, getattr(inner, "concurrency", 8))
        self.kind = inner.kind
        self.streams_requests = inner.streams_requests
        self.stats = inner.stats
        self._closed = False

    def identity(self) -> dict[str, Any]:
        return self.inner.identity()

    @property
    def supports_scores(self) -> bool:  # asked of the backend when needed: a served model's is detected on first use
        return self.inner.supports_scores

    @property
    def scoring_note(self) -> str:
        return getattr(self.inner, "scoring_note", "")

    def _through(self, requests: list, compute: Callable[[list], list], encode, decode, stream=None) -> list:
        """Answers from the cache, the rest from the backend (``stream``: its ``generate_stream``, else ``compute``
        chunk by chunk), saved as they arrive, failures excepted."""
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
        failed: dict[str, Any] = {}  # key -> the backend's result carrying Failed: returned, never stored

        def keep(key: str, result) -> None:
            if failure(result) is not None:
                failed[key] = result
                return
            value = encode(result)
            self.cache.put_many({key: value})
            found[key] = value

        if stream is not None and pending:
            for j, result in stream([requests[i] for _, i in pending]):
                keep(pending[j][0], result)
        else:
            for start in range(0, len(pending), self.chunk_size):
                chunk = pending[start:start + self.chunk_size]
                results = compute([requests[i] for _, i in chunk])
                good = {}
                for (k, _), res in zip(chunk, results):
                    if failure(res) is not None:
                        failed[k] = res
                    else:
                        good[k] = encode(res)
                self.cache.put_many(good)
                found.update(good)
        return [failed[k] if k in failed else decode(found[k]) for k in keys]

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        stream = self.inner.generate_stream if self.inner.streams_requests else None
        return self._through(requests, self.inner.generate, lambda r: list(r), lambda v: list(v), stream)

    def score(self, requests: list[ScoreRequest]) -> list[list[CandidateScore]]:
        return self._through(requests, self.inner.score,
                             lambda r: [[s.logprob, s.n_tokens] for s in r],
                             lambda v: [CandidateScore(lp, n) for lp, n in v])

    def close(self) -> None:
        """Close the backend and the cache file, once; the file is closed even if the backend's close fails."""
        if self._closed:
            return
        self._closed = True
        try:
            self.inner.close()
        finally:
            self.cache.close()
