"""Candidate-scoring throughput of a local transformers model on a GPU: naive per-label passes (one at a time, and
all labels of a query as one padded batch, as evaluation harnesses do), the one-pass label trie one query at a time, and the trie with several queries per forward pass; plus free-text generation of the
label (what the paper's code does, one prompt at a time) for comparison. Speed only: accuracy needs real weights
and comes from ``python -m cm_core evaluate --model hf:ID``.

With weights (online, or a local path):
    python benchmarks/bench_gpu.py --model meta-llama/Llama-3.1-8B-Instruct
Without weights (an offline GPU box): a randomly initialised model of the same shape gives the same FLOPs and
memory traffic, so the same speed; its answers are noise, so no accuracy is reported:
    python benchmarks/bench_gpu.py --shape llama3-8b --tokenizer PATH_WITH_A_CHAT_TOKENIZER
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cm_core import prompts
from cm_core.backends import GenRequest, ScoreRequest
from cm_core.backends.hf import TransformersLLM
from cm_core.data import load_dataset, split_dataset

# Published shapes (config.json of each model); vocab comes from the tokenizer used.
SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, max_position_embeddings=8192),
}


def random_model(shape: str, tokenizer: str, dtype: torch.dtype, device: str):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = LlamaConfig(vocab_size=len(tok), tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model, tok


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def naive_batched_score(llm: TransformersLLM, req: ScoreRequest, chunk: int = 64):
    """The usual harness way (lm-evaluation-harness style): every prompt+candidate sequence as one row of a
    right-padded batch, so the prompt is recomputed once per candidate but in parallel."""
    prompt = llm._prompt_ids(req.messages)
    cands = [llm._candidate_ids(c) for c in req.candidates]
    out = []
    dev = llm._dev
    with torch.inference_mode():
        for i in range(0, len(cands), chunk):
            part = cands[i:i + chunk]
            L = len(prompt) + max(len(c) for c in part)
            ids = torch.full((len(part), L), llm.tok.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(part), L), dtype=torch.long)
            for r, c in enumerate(part):
                ids[r, :len(prompt) + len(c)] = torch.tensor(prompt + c)
                mask[r, :len(prompt) + len(c)] = 1
            lp = torch.log_softmax(llm.model_obj(ids.to(dev), attention_mask=mask.to(dev)).logits.float(), -1)
            for r, c in enumerate(part):
                pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(c), device=dev)
                out.append(float(lp[r, pos, torch.tensor(c, device=dev)].sum()))
    return out


def bench_dataset(llm: TransformersLLM, dataset: str, n: int, n_naive: int, batches: list[int], seed: int,
                  gen_queries: int) -> dict:
    ds = load_dataset(dataset)
    texts = split_dataset(ds, pref_count=1, n_test=n, seed=seed).test.texts
    reqs = [ScoreRequest.of(prompts.zero_shot(t, None), ds.labels) for t in texts]
    row: dict = {"dataset": dataset, "labels": len(ds.labels), "queries": len(reqs)}
    llm.score_batch_size = 1
    llm.score(reqs[:2])  # warm-up
    naive, t = timed(lambda: [llm.naive_score(r) for r in reqs[:n_naive]])
    row["naive_qps"] = n_naive / t
    nb, t = timed(lambda: [naive_batched_score(llm, r) for r in reqs[:n_naive]])
    row["naive_batched_qps"] = n_naive / t
    ref = None
    for bs in batches:
        llm.score_batch_size = bs
        llm.score(reqs[:bs])  # warm-up at this shape
        out, t = timed(lambda: llm.score(reqs))
        row[f"trie_b{bs}_qps"] = len(reqs) / t
        ref = ref or out
        diff = max(abs(a.logprob - b.logprob) for fa, sa in zip(out, ref) for a, b in zip(fa, sa))
        row[f"trie_b{bs}_max_abs_diff_vs_b{batches[0]}"] = diff
    row["max_abs_diff_trie_vs_naive"] = max(abs(a.logprob - b.logprob)
                                            for fa, sa in zip(ref, naive) for a, b in zip(fa, sa))
    # argmax agreement is what matters for the answer; bf16 can swap near-ties
    row["argmax_agreement_trie_vs_naive"] = sum(
        max(range(len(f)), key=lambda i: f[i].logprob) == max(range(len(s)), key=lambda i: s[i].logprob)
        for f, s in zip(ref, naive)) / len(naive)
    best = max(batches, key=lambda b: row[f"trie_b{b}_qps"])
    row["speedup_trie_best_vs_naive"] = row[f"trie_b{best}_qps"] / row["naive_qps"]
    row["speedup_trie_best_vs_naive_batched"] = row[f"trie_b{best}_qps"] / row["naive_batched_qps"]
    row["speedup_trie_b1_vs_naive_batched"] = row["trie_b1_qps"] / row["naive_batched_qps"]
    row["max_abs_diff_naive_batched_vs_naive"] = max(abs(a - b.logprob) for fa, sa in zip(nb, naive)
                                                     for a, b in zip(fa, sa))
    row["speedup_batched_vs_b1"] = row[f"trie_b{best}_qps"] / row["trie_b1_qps"] if 1 in batches else None
    if gen_queries:
        greqs = [GenRequest.of(prompts.zero_shot(t, ds.labels), n=1, temperature=0.0, max_tokens=16, seed=seed)
                 for t in texts[:gen_queries]]
        llm.generate(greqs[:1])
        _, t = timed(lambda: llm.generate(greqs))
        row["generate16_qps"] = len(greqs) / t
        row["speedup_trie_best_vs_generate"] = row[f"trie_b{best}_qps"] / row["generate16_qps"]
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help="hub id or local path of a causal LM with a chat template")
    g.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape (speed only)")
    ap.add_argument("--tokenizer", help="tokenizer (with chat template) for --shape")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--datasets", default="clinc,banking77")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--naive-queries", type=int, default=4)
    ap.add_argument("--batches", default="1,8,16")
    ap.add_argument("--generate-queries", type=int, default=8)
    ap.add_argument("--seed", type=int, default=40)
    ap.add_argument("--output", default="benchmarks/results/gpu.json")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, a.dtype)
    t0 = time.perf_counter()
    if a.model:
        llm = TransformersLLM(a.model, device=device, dtype=a.dtype)
    else:
        model, tok = random_model(a.shape, a.tokenizer, dtype, device)
        llm = TransformersLLM(f"random:{a.shape}", device=device, dtype=a.dtype, model=model, tokenizer=tok)
    load_s = time.perf_counter() - t0
    params = sum(p.numel() for p in llm.model_obj.parameters())
    rows = [bench_dataset(llm, d, a.queries, a.naive_queries, [int(b) for b in a.batches.split(",")], a.seed,
                          a.generate_queries) for d in a.datasets.split(",")]
    info = {"model": a.model or f"random weights, shape {a.shape}", "weights": "real" if a.model else "random",
            "parameters": params, "dtype": a.dtype, "device": torch.cuda.get_device_name() if device == "cuda"
            else platform.processor(), "torch": torch.__version__, "load_s": load_s, "seed": a.seed,
            "peak_gpu_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps({"info": info, "rows": rows}, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
