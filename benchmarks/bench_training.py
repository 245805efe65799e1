"""Per-user TRAINING baselines vs CM on exactly CM's preference samples (issue 18): accuracy (bootstrap 95% CI)
against adaptation seconds per user, per-user storage and inference seconds per query, on the embedded model.

    python -m benchmarks.bench_training                       # banking77 + clinc, 1 % and 5 %: see --help for time
    python -m benchmarks.bench_training --quick               # smoke: banking77, 1 %, 5 test queries, 1 epoch
    python -m benchmarks.bench_training --setting misaligned  # the user's labels renamed (cm_core.misalign)

Methods, per (dataset, preference fraction), all fitted on the same preference samples and scored on the same test
rows (protocol ``ours``: ``load_dataset`` + ``split_dataset``, seed 40):

- ``zero_shot`` (no adaptation) and ``zero_shot+cm``, ``+cm_paper``, ``+cm_soft``, ``+cm_shrunk`` (one bank; with
  ``--setting misaligned`` the base is ``own_words``, the model answering in its own label names);
- ``lora_sft`` at 1/2/4 epochs, ``dpo`` at 1/2/4 epochs, ``frozen_head`` (cm_core.training), ``knn``, ``logreg``.

How times are measured (wall clock, one process, 2 torch threads unless the machine has fewer cores):

- CM's adaptation is cold: every setting gets a fresh response cache, and ``zero_shot+cm``'s fit (answering every
  preference sample, counting the bank, preparing the re-ask calibrations) is timed with nothing cached. The other
  CM forms reuse that bank: ``+cm_paper`` does the same work (same time), ``+cm_shrunk`` that plus its own fit on
  the given bank (the prior's search), ``+cm_soft`` the answering part alone plus its own fit (no re-ask).
- DPO needs the same zero-shot answers on the samples (the same scoring requests: its rejected replies are the
  bank's answers), so through the shared cache it finds them computed; its adaptation is charged the cold answering
  time measured inside CM's fit plus its own fit (pairs, loading a copy of the weights, training, merging). Where
  its requests differ from the bank's (misaligned: the bank is own_words') it answers cold itself.
- LoRA/DPO adaptation includes loading a fresh copy of the weights and merging the adapter; ``frozen_head``'s is
  reading hidden states of the samples and fitting the head; kNN/logreg's is embedding the samples (memo cleared).
- Inference seconds per query: the method's ``predict`` over the test rows / n_test, nothing cached (the adapted
  models are never cached). For CM forms: the base's per-query time plus their second calls (``+cm``'s are
  measured cold; the other hard forms' re-asks partly hit ``+cm``'s in the cache, so theirs is derived: second-call
  rate x ``+cm``'s measured cost per second call); the soft form has no second call.
- CM's floor: the base method's inference cost per query x the number of preference samples (the bank cannot be
  made without answering every sample once); reported as the ratio of CM's cold adaptation to it.
- Time to reach: for LoRA and DPO, the adaptation time of the fewest epochs whose accuracy reaches each CM form's
  (or null: not reached within the epochs run), and whether each CM form reaches each of their epochs.

Per-user storage: the bank's JSON (bytes of ``MemoryBank.to_json``), the LoRA adapter's saved files (safetensors +
config), the frozen head's JSON, for kNN the samples' float32 embeddings and for logreg its float32 coefficients
(both derived from their shapes). Writes ``<out-dir>/training.json`` (``training_quick.json`` with ``--quick``,
``training_misaligned.json`` for the misaligned setting) and the matching ``.png``; the JSON is rewritten after
every setting, so an interrupted run keeps what it finished.
"""
from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch

from cm_core.backends import CachedLLM, make_backend
from cm_core.data import load_dataset, split_dataset
from cm_core.embeddings import get_embedder
from cm_core.evaluate import accuracy, bootstrap_ci
from cm_core.methods import Decoding
from cm_core.registry import build

CM_FORMS = ("+cm", "+cm_paper", "+cm_soft", "+cm_shrunk")
FAMILIES = {"lora_sft": {1: "lora_sft", 2: "lora_sft_e2", 4: "lora_sft_e4"},
            "dpo": {1: "dpo", 2: "dpo_e2", 4: "dpo_e4"}}


def _misaligned():
    """The misaligned-dataset function of cm_core.misalign, under either name it has had."""
    from cm_core import misalign
    return getattr(misalign, "misaligned_dataset", None) or misalign.misaligned


def _scored(gold, pred, seed: int) -> dict:
    return {"accuracy": accuracy(gold, pred), "ci95": bootstrap_ci(gold, pred, seed=seed)}


def _timed_predict(method, texts):
    t0 = time.perf_counter()
    preds = method.predict(texts)
    return preds, time.perf_counter() - t0


def run_setting(uncached, dname: str, frac: float, a, setting: str) -> dict:
    ds = load_dataset(dname)
    own: dict = {}
    base_name = "zero_shot"
    if setting == "misaligned":
        ds, responses = _misaligned()(ds, a.scheme)
        own, base_name = {"responses": responses}, "own_words"
    split = split_dataset(ds, pref_fraction=frac, n_test=a.n_test, seed=a.seed)
    samples, test = split.preference.examples, split.test
    gold, n = test.targets, len(test.texts)
    dec = Decoding(seed=a.seed)
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cm-bench-training-") as cache_dir:
        llm = CachedLLM(uncached, Path(cache_dir) / "responses.sqlite")  # fresh: CM's adaptation is cold
        stats = llm.stats

        # ---- CM: the bank from the base's answers on the samples, cold
        cm = build(f"{base_name}+cm", labels=ds.labels, llm=llm, decoding=dec, seed=a.seed, **own)
        answering = {"s": 0.0}
        answer = cm.base.answer_samples

        def timed_answers(*args, **kw):  # the answering part of CM's fit, charged to DPO too
            t = time.perf_counter()
            try:
                return answer(*args, **kw)
            finally:
                answering["s"] += time.perf_counter() - t
        cm.base.answer_samples = timed_answers
        hits0 = stats.cache_hits
        t0 = time.perf_counter()
        cm.fit(samples)
        cm_adapt = time.perf_counter() - t0
        if stats.cache_hits != hits0:
            raise SystemExit("CM's adaptation read the response cache: it must be cold")
        answer_s = answering["s"]
        with tempfile.TemporaryDirectory() as tmp:
            cm.bank_.to_json(Path(tmp) / "bank.json")
            bank_bytes = (Path(tmp) / "bank.json").stat().st_size
        base = cm.base

        # ---- the base alone, cold on the test rows: inference per query, and CM's floor
        base_preds, base_s = _timed_predict(base, test.texts)
        per_query = base_s / n
        floor = per_query * len(samples)
        rows[base_name] = {"kind": "base", "adapt_s": 0.0, "storage_bytes": 0, "infer_s_per_query": per_query,
                           **_scored(gold, [p.label for p in base_preds], a.seed)}

        # ---- the CM forms over the one bank
        second_cost = None
        for form in CM_FORMS:
            name = base_name + form
            if form == "+cm":
                variant, fit_s = cm, 0.0
            else:
                variant = build(name, labels=ds.labels, llm=llm, decoding=dec, seed=a.seed, bank=cm.bank_,
                                base=base, **own)
                t0 = time.perf_counter()
                variant.fit(samples)
                fit_s = time.perf_counter() - t0
            preds, pred_s = _timed_predict(variant, test.texts)  # base answers now come from the cache
            seconds = [p for p in preds if p.info.get("action") == "choose"]
            rate = len(seconds) / n
            if form == "+cm":
                second_cost = pred_s / max(1, len(seconds))
                infer = per_query + pred_s / n
            else:
                infer = per_query + rate * (second_cost or 0.0)
            # adaptation: +cm's cold fit; +cm_paper does the same work (same bank, same re-ask sets); +cm_shrunk
            # adds its prior search and any re-ask set +cm had not prepared; the soft form prepares no re-ask
            adapt = {"+cm": cm_adapt, "+cm_paper": cm_adapt, "+cm_shrunk": cm_adapt + fit_s}.get(form,
                                                                                              answer_s + fit_s)
            rows[name] = {"kind": "cm", "adapt_s": adapt, "storage_bytes": bank_bytes, "infer_s_per_query": infer,
                          "second_call_rate": rate, **_scored(gold, [p.label for p in preds], a.seed)}
            if getattr(variant, "shrinkage_", None):
                rows[name]["shrink_alpha"] = variant.shrinkage_.get("alpha")
        rows[base_name + "+cm"].update(answer_s=answer_s, floor_s=floor, adapt_over_floor=cm_adapt / floor)

        # ---- the training baselines
        trained = [FAMILIES[f][e] for f in FAMILIES for e in a.epochs if e in FAMILIES[f]] + ["frozen_head"]
        cold_answers = {}  # DPO's answering time, measured cold once: inside CM's fit or by the first DPO fit
        for name in trained:
            print(f"  {name} ...", flush=True)
            score_calls = stats.score_calls
            m = build(name, labels=ds.labels, llm=llm, decoding=dec).fit(samples)
            adapt = m.adapt_seconds_
            extra = {"train_s": getattr(m, "train_seconds_", None), "train_loss": getattr(m, "train_loss_", None),
                     "fingerprint": m.fingerprint_}
            if hasattr(m, "n_pairs_"):  # DPO: charge its answering cold, however much of it the cache served
                if "dpo" not in cold_answers:  # the first DPO fit: answered cold, or found the bank's answers
                    from_bank = stats.score_calls == score_calls  # identical requests, timed inside CM's fit
                    cold_answers["dpo"] = (answer_s, "cm bank") if from_bank else (m.answer_seconds_, "dpo")
                secs, source = cold_answers["dpo"]
                adapt = adapt - m.answer_seconds_ + secs
                extra.update(n_pairs=m.n_pairs_, answer_s=secs, answers_timed_in=source)
            preds, pred_s = _timed_predict(m, test.texts)
            rows[name] = {"kind": "trained", "adapt_s": adapt, "storage_bytes": m.storage_bytes_,
                          "infer_s_per_query": pred_s / n, **extra,
                          **_scored(gold, [p.label for p in preds], a.seed)}
            del m, preds
            gc.collect()

        # ---- classifiers on sentence embeddings
        for name in ("knn", "logreg"):
            get_embedder()._memo.clear()
            m = build(name, labels=ds.labels)
            t0 = time.perf_counter()
            m.fit(samples)
            adapt = time.perf_counter() - t0
            get_embedder()._memo.clear()
            preds, pred_s = _timed_predict(m, test.texts)
            if name == "knn":
                stored = m.model_._fit_X.size * 4  # the samples' embeddings, float32
            else:
                stored = 0 if m.single_ is not None else (m.model_.coef_.size + m.model_.intercept_.size) * 4
            rows[name] = {"kind": "classifier", "adapt_s": adapt, "storage_bytes": int(stored),
                          "infer_s_per_query": pred_s / n, **_scored(gold, [p.label for p in preds], a.seed)}
        llm.cache.close()

    out = {"dataset": ds.name, "pref_fraction": frac, "pref_count": len(samples), "n_test": n,
           "n_test_requested": a.n_test, "setting": setting, "base": base_name, "methods": rows}
    out["reach"] = reach(rows, base_name)
    return out


def reach(rows: dict, base_name: str) -> dict:
    """For LoRA and DPO: the fewest epochs (and their adaptation time) reaching each CM form's accuracy, and whether
    each CM form reaches each of their epoch counts (CM's time against theirs)."""
    out = {}
    for fam, by_epoch in FAMILIES.items():
        points = [(e, rows[n]) for e, n in sorted(by_epoch.items()) if n in rows]
        if not points:
            continue
        fam_out = {}
        for form in CM_FORMS:
            cm = rows.get(base_name + form)
            if cm is None:
                continue
            hit = next(((e, r) for e, r in points if r["accuracy"] >= cm["accuracy"]), None)
            fam_out[base_name + form] = {
                "cm_accuracy": cm["accuracy"], "cm_adapt_s": cm["adapt_s"],
                "epochs_to_reach_cm": hit[0] if hit else None,
                "their_adapt_s_to_reach_cm": hit[1]["adapt_s"] if hit else None,
                "their_time_over_cm_time": hit[1]["adapt_s"] / cm["adapt_s"] if hit else None,
                "cm_reaches": {str(e): {"their_accuracy": r["accuracy"], "their_adapt_s": r["adapt_s"],
                                        "cm_at_least_as_accurate": cm["accuracy"] >= r["accuracy"],
                                        "cm_time_over_their_time": cm["adapt_s"] / r["adapt_s"]}
                               for e, r in points}}
        out[fam] = fam_out
    return out


def figure(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns
    sns.set_theme(style="whitegrid", font_scale=0.8)
    datasets = list(dict.fromkeys(r["dataset"] for r in results))
    fracs = sorted({r["pref_fraction"] for r in results})
    fig, axes = plt.subplots(len(datasets), len(fracs), figsize=(5.2 * len(fracs), 4.2 * len(datasets)),
                             squeeze=False)
    colours = {"base": "grey", "cm": "tab:blue", "lora_sft": "tab:red", "dpo": "tab:purple", "frozen_head": "tab:green",
               "classifier": "tab:orange"}
    for r in results:
        ax = axes[datasets.index(r["dataset"])][fracs.index(r["pref_fraction"])]
        ms = r["methods"]
        for name, m in ms.items():
            fam = next((f for f in FAMILIES if name in FAMILIES[f].values()), None)
            key = fam or ("frozen_head" if name == "frozen_head" else m["kind"])
            x = max(m["adapt_s"], 0.05)  # no adaptation: drawn at the axis' left
            lo, hi = m["ci95"]
            ax.errorbar(x, 100 * m["accuracy"], yerr=[[100 * (m["accuracy"] - lo)], [100 * (hi - m["accuracy"])]],
                        fmt="o", color=colours.get(key, "black"), capsize=2, ms=4, alpha=0.85)
            ax.annotate(name.replace(r["base"], "").lstrip("+") or r["base"], (x, 100 * m["accuracy"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
        for fam, by_epoch in FAMILIES.items():
            pts = [ms[n] for _, n in sorted(by_epoch.items()) if n in ms]
            if len(pts) > 1:
                ax.plot([max(p["adapt_s"], 0.05) for p in pts], [100 * p["accuracy"] for p in pts],
                        color=colours[fam], lw=1, alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(f"{r['dataset']}, {r['pref_fraction']:.0%} ({r['pref_count']} samples), n_test={r['n_test']}")
        ax.set_xlabel("adaptation per user, s (log)")
        ax.set_ylabel("accuracy % (95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="banking77,clinc")
    ap.add_argument("--fractions", default="0.01,0.05")
    ap.add_argument("--n-test", type=int, default=50)
    ap.add_argument("--epochs", default="1,2,4", help="LoRA/DPO epoch counts among 1,2,4 (registered names)")
    ap.add_argument("--seed", type=int, default=40)
    ap.add_argument("--setting", choices=("aligned", "misaligned"), default="aligned",
                    help="misaligned: the user's labels renamed (cm_core.misalign), own_words as CM's base")
    ap.add_argument("--scheme", default="codes", help="misaligned: the renaming scheme (codes, nicknames)")
    ap.add_argument("--quick", action="store_true", help="smoke run: banking77, 1 %%, 5 test queries, 1 epoch")
    ap.add_argument("--out-dir", default="benchmarks/results")
    ap.add_argument("--resume", action="store_true",
                    help="keep the settings already in the output JSON (same n_test, seed, epochs) and run the rest")
    a = ap.parse_args()
    if a.quick:
        a.datasets, a.fractions, a.n_test, a.epochs = "banking77", "0.01", 5, "1"
    a.epochs = [int(e) for e in a.epochs.split(",")]
    if set(a.epochs) - {1, 2, 4}:
        raise SystemExit("--epochs: the registered epoch counts are 1, 2 and 4")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    stem = "training" + ("_misaligned" if a.setting == "misaligned" else "") + ("_quick" if a.quick else "")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    uncached = make_backend("embedded", use_cache=False)
    t_start = time.perf_counter()
    results: list[dict] = []
    done: dict[tuple, dict] = {}
    if a.resume and (out_dir / f"{stem}.json").is_file():
        old = json.loads((out_dir / f"{stem}.json").read_text())
        if (old.get("seed"), old.get("epochs"), old.get("scheme")) == (a.seed, a.epochs, doc_scheme(a)):
            done = {(r["dataset"], r["pref_fraction"], r.get("n_test_requested")): r for r in old["results"]}
    for dname in a.datasets.split(","):
        for frac in map(float, a.fractions.split(",")):
            kept = next((r for (d, f, nt), r in done.items() if d.split(":")[0] == dname and f == frac
                         and nt == a.n_test), None)
            if kept is not None:
                print(f"{dname} {frac:.0%}: kept from {out_dir / (stem + '.json')}", flush=True)
                results.append(kept)
                continue
            t0 = time.perf_counter()
            print(f"{dname} {frac:.0%} ...", flush=True)
            res = run_setting(uncached, dname, frac, a, a.setting)
            res["wall_s"] = time.perf_counter() - t0
            results.append(res)
            print(f"{res['dataset']} {frac:.0%} ({res['pref_count']} samples, n_test={res['n_test']}): "
                  f"{res['wall_s']:.0f} s", flush=True)
            for name, m in res["methods"].items():
                print(f"  {name:22s} acc={100 * m['accuracy']:5.1f} [{100 * m['ci95'][0]:4.1f}, "
                      f"{100 * m['ci95'][1]:4.1f}]  adapt={m['adapt_s']:8.2f}s  infer={m['infer_s_per_query']:6.3f}"
                      f"s/q  storage={m['storage_bytes']:>9,d} B", flush=True)
            cm = res["methods"][res["base"] + "+cm"]
            print(f"  CM cold adaptation / floor (base s/query x samples) = {cm['adapt_over_floor']:.2f}", flush=True)
            doc = {"model": uncached.identity(), "seed": a.seed, "setting": a.setting, "scheme": doc_scheme(a),
                   "epochs": a.epochs,
                   "torch_threads": torch.get_num_threads(), "quick": a.quick,
                   "wall_s": time.perf_counter() - t_start, "results": results}
            (out_dir / f"{stem}.json").write_text(json.dumps(doc, indent=2))
            figure(results, out_dir / f"{stem}.png")
    ran = len(results) - sum(1 for r in results if r in done.values())
    print(f"total {time.perf_counter() - t_start:.0f} s; {ran} setting(s) run"
          + (f", written to {out_dir / (stem + '.json')} and .png" if ran else ", nothing new to write"))


def doc_scheme(a) -> str | None:
    return a.scheme if a.setting == "misaligned" else None


if __name__ == "__main__":
    main()
