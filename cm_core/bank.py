"""The memory bank: counts of (base response -> the user's label), an empirical p(Y'|Y).

Plain data, saved as versioned JSON. The paper's own format (a JSON object mapping a response to a list of
labels) can be imported; it carries no counts, so each listed label counts once.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BankError

BANK_FORMAT = "cm-memory-bank"
BANK_VERSION = 1
MAX_BANK_BYTES = 20 * 1024 * 1024


@dataclass
class MemoryBank:
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    def add(self, response: str, label: str, count: int = 1) -> None:
        row = self.counts.setdefault(response, {})
        row[label] = row.get(label, 0) + count

    @classmethod
    def from_pairs(cls, pairs, meta: dict | None = None) -> "MemoryBank":
        bank = cls(meta=dict(meta or {}))
        for response, label in pairs:
            bank.add(response, label)
        return bank

    # ------------------------------------------------------------------ reading
    def candidates(self, response: str) -> dict[str, int]:
        """Labels seen with this base response, most frequent first (ties alphabetical)."""
        row = self.counts.get(response, {})
        return dict(sorted(row.items(), key=lambda kv: (-kv[1], kv[0])))

    def conditional(self, response: str) -> dict[str, float]:
        """p(y'|ŷ) from the counts; empty when ŷ never occurred."""
        row = self.candidates(response)
        total = sum(row.values())
        return {k: v / total for k, v in row.items()} if total else {}

    def __contains__(self, response: str) -> bool:
        return response in self.counts

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def n_samples(self) -> int:
        return sum(sum(r.values()) for r in self.counts.values())

    def stats(self) -> dict[str, Any]:
        """Size and shape: how many responses have 0/1/several candidate labels, and how often ŷ != y*."""
        n = self.n_samples
        agree = sum(r.get(k, 0) for k, r in self.counts.items())
        return {
            "entries": len(self.counts),
            "samples": n,
            "single_candidate": sum(1 for r in self.counts.values() if len(r) == 1),
            "multi_candidate": sum(1 for r in self.counts.values() if len(r) > 1),
            "distinct_labels": len({lab for r in self.counts.values() for lab in r}),
            "agreement": agree / n if n else 0.0,
        }

    def rows(self) -> list[dict[str, Any]]:
        """Flat table (response, label, count, p) for display and export."""
        out = []
        for resp in sorted(self.counts):
            cond = self.conditional(resp)
            for lab, c in self.candidates(resp).items():
                out.append({"response": resp, "label": lab, "count": c, "p": round(cond[lab], 4)})
        return out

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": BANK_FORMAT, "version": BANK_VERSION, "meta": self.meta,
                "counts": {k: dict(v) for k, v in sorted(self.counts.items())}}

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    @classmethod
    def from_dict(cls, obj: Any, source: str = "<bank>") -> "MemoryBank":
        """Accept our versioned format or the paper's {response: [labels]}; anything else is a BankError."""
        if not isinstance(obj, dict):
            raise BankError(f"a memory bank must be a JSON object, got {type(obj).__name__}", source=source)
        if obj.get("format") == BANK_FORMAT:
            if obj.get("version") != BANK_VERSION:
                raise BankError(f"memory bank version {obj.get('version')!r} is not supported (this is version "
                                f"{BANK_VERSION})", source=source)
            counts, meta = obj.get("counts"), obj.get("meta", {})
            if not isinstance(counts, dict) or not isinstance(meta, dict):
                raise BankError("'counts' and 'meta' must be JSON objects", source=source)
            bank = cls(meta=meta)
            for resp, row in counts.items():
                if not isinstance(row, dict) or not row:
                    raise BankError(f"entry {resp!r} must map labels to counts", source=source)
                for lab, c in row.items():
                    if isinstance(c, bool) or not isinstance(c, int) or c <= 0:
                        raise BankError(f"count of {resp!r} -> {lab!r} must be a positive integer, got {c!r}",
                                        source=source)
                    bank.add(resp, lab, c)
            return bank
        if "format" in obj or "version" in obj:
            raise BankError(f"unknown memory bank format {obj.get('format')!r}", source=source)
        if not obj:
            raise BankError("empty bank ({}): it has no entries", source=source)
        return cls.from_paper(obj, source)

    @classmethod
    def from_paper(cls, obj: dict, source: str = "<bank>") -> "MemoryBank":
        """The official code's bank: {cleaned answer: [distinct true labels]}."""
        bank = cls(meta={"imported_from": "paper-format"})
        for resp, labels in obj.items():
            if isinstance(labels, str):
                labels = [labels]
            if not isinstance(labels, list) or not labels or not all(isinstance(x, str) and x for x in labels):
                raise BankError(f"entry {resp!r} must be a non-empty list of label strings", source=source)
            for lab in Counter(labels):
                bank.add(resp, lab)
        return bank

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "MemoryBank":
        source = "<bank>"
        text = text_or_path
        looks_like_json = isinstance(text_or_path, str) and text_or_path.lstrip()[:1] in ("{", "[", '"')
        if isinstance(text_or_path, Path) or (not looks_like_json and len(text_or_path) < 4096
                                              and (Path(text_or_path).is_file() or text_or_path.endswith(".json"))):
            p = Path(text_or_path)
            source = str(p)
            if not p.is_file():
                raise BankError("file not found", source=source)
            if p.stat().st_size > MAX_BANK_BYTES:
                raise BankError(f"file over the {MAX_BANK_BYTES // 2**20} MB limit", source=source)
            raw = p.read_bytes()
            if raw[:1] == b"\x80" or p.suffix.lower() in (".pkl", ".pickle"):  # protocol 2+ starts with 0x80
                raise BankError("a pickle file: give the bank as JSON (pickles are never loaded: unpickling runs "
                                "code)", source=source)
            try:
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise BankError("not UTF-8 text", source=source) from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise BankError(f"malformed JSON ({e.msg})", source=source, line=e.lineno) from None
        except (ValueError, RecursionError) as e:  # a number too long for int(), or nesting deeper than the stack
            problem = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(":")[0]
            raise BankError(f"malformed JSON ({problem})", source=source) from None
        return cls.from_dict(obj, source)
