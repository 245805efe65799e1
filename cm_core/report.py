"""Tables, figures and sentences for the evaluation and memory-bank reports (notebooks/ and reports/index.html).

Every function takes the plain data that :func:`cm_core.evaluate.run_evaluation` returns (the results dict), a
memory-bank inspection from :func:`cm_core.experiments.inspect_bank`, or a list of results for a whole grid,
and returns a pandas DataFrame / Styler, a matplotlib Figure or a string. Nothing here calls an LLM.

Figures are built on :class:`matplotlib.figure.Figure` directly (not pyplot), so a notebook shows each once
and a script never leaks open figures.
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from .registry import BASELINES, CM_VARIANTS, LLM_METHODS, split_method_name

ALPHA = 0.05
VARIANT_ORDER = ("base", *CM_VARIANTS)  # base, +cm, +cm_paper, +cm_soft
VARIANT_COLORS = {"base": "#8c8c8c", "+cm": "#1f77b4", "+cm_paper": "#2ca02c", "+cm_soft": "#9467bd",
                  "+cm_shrunk": "#ff7f0e", "+cm_soft_shrunk": "#8c564b", "+cm_em": "#e377c2"}


# --------------------------------------------------------------------------- formatting

def fmt_acc(x: float | None) -> str:
    """Accuracy as a percentage with one decimal: 0.8 -> '80.0'. The one format every report uses."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}"


def fmt_ci(ci: Sequence[float] | None) -> str:
    if not ci:
        return ""
    return f"[{fmt_acc(ci[0])}, {fmt_acc(ci[1])}]"


def fmt_acc_ci(r: Mapping[str, Any]) -> str:
    """'80.0 [60.0, 100.0]' for one method's result entry."""
    return f"{fmt_acc(r['accuracy'])} {fmt_ci(r.get('ci95'))}".strip()


def fmt_p(p: float | None) -> str:
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return ""
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def is_significant(r: Mapping[str, Any], alpha: float = ALPHA) -> bool:
    """A CM variant that beats its base: p < alpha (paired McNemar) and a positive accuracy delta."""
    p, d = r.get("p_value"), r.get("delta")
    return p is not None and d is not None and p < alpha and d > 0


def method_order(names: Iterable[str]) -> list[str]:
    """LLM methods in registry order, each followed by its CM variants, then the baselines likewise."""
    names = list(dict.fromkeys(names))

    def key(name: str):
        try:
            base, variant = split_method_name(name)
        except Exception:
            return (2, 0, 0, name)
        group = 0 if base in LLM_METHODS else 1
        order = (LLM_METHODS + BASELINES).index(base)
        return (group, order, VARIANT_ORDER.index(variant or "base"), name)

    return sorted(names, key=key)


def _scored(results: Mapping[str, Any]) -> dict[str, dict]:
    """The method entries that were evaluated (skipped variants left out), in display order."""
    res = results["results"]
    return {m: res[m] for m in method_order(res) if "skipped" not in res[m]}


def model_name(config: Mapping[str, Any]) -> str:
    m = config.get("model")
    if not m:
        return "none (baselines only)"
    if isinstance(m, Mapping):
        return f"{m.get('kind', '?')}:{m.get('model', '?')}"
    return str(m)


# --------------------------------------------------------------------------- one run: tables and sentences

def show(df: pd.DataFrame):
    """A DataFrame for display: no index column, text left-aligned, long cells not truncated (a pandas Styler)."""
    left = [{"selector": "th", "props": [("text-align", "left")]}]
    return df.style.hide(axis="index").set_properties(**{"text-align": "left"}).set_table_styles(left)


def results_frame(results: Mapping[str, Any]) -> pd.DataFrame:
    """One row per evaluated method, numbers unformatted (accuracy in [0, 1])."""
    rows = []
    for name, r in _scored(results).items():
        base, variant = split_method_name(name)
        rows.append({"method": name, "base": base, "variant": variant or "base", "kind": r.get("kind", ""),
                     "accuracy": r["accuracy"], "ci_low": r["ci95"][0], "ci_high": r["ci95"][1],
                     "macro_f1": r.get("macro_f1"), "delta": r.get("delta"), "p_value": r.get("p_value"),
                     "significant": is_significant(r), "second_call_rate": r.get("second_call_rate"),
                     "n": r.get("n")})
    return pd.DataFrame(rows)


def results_table(results: Mapping[str, Any]):
    """The results table for display: accuracy with its 95% CI, macro-F1, Δ and p of each CM variant against
    its base. Significant CM improvements (p < 0.05, Δ > 0) in bold; the best accuracy underlined."""
    df = results_frame(results)
    if df.empty:
        return pd.DataFrame({"method": [], "accuracy": []})
    best = df["accuracy"].max()
    show = pd.DataFrame({
        "method": df["method"],
        "kind": df["kind"],
        "accuracy": [fmt_acc(x) for x in df["accuracy"]],
        "95% CI": [fmt_ci([lo, hi]) for lo, hi in zip(df["ci_low"], df["ci_high"])],
        "macro-F1": [fmt_acc(x) for x in df["macro_f1"]],
        "Δ vs base": ["" if d is None or pd.isna(d) else f"{100 * d:+.1f}" for d in df["delta"]],
        "p": [fmt_p(None if p is None or pd.isna(p) else p) for p in df["p_value"]],
        "second calls": ["" if s is None or pd.isna(s) else f"{100 * s:.0f}%" for s in df["second_call_rate"]],
        "n": df["n"],
    })
    sig = list(df["significant"])
    top = [a == best for a in df["accuracy"]]

    def style_row(row):
        i = row.name
        css = []
        for col in row.index:
            s = ""
            if sig[i] and col in ("method", "accuracy", "Δ vs base"):
                s += "font-weight: bold;"
            if top[i] and col == "accuracy":
                s += "text-decoration: underline;"
            css.append(s)
        return css

    return show.style.apply(style_row, axis=1).hide(axis="index")


def run_info(obj: Mapping[str, Any]) -> pd.DataFrame:
    """Model, data, split, seed, wall time, LLM calls and package versions of a results dict or bank inspection."""
    c, run = obj.get("config", {}), obj.get("run", {})
    calls = run.get("llm_calls") or {}
    rows = [
        ("protocol", _protocol_text(c)),
        ("model", model_name(c)),
        ("dataset", f"{c.get('dataset')} ({c.get('n_labels')} labels; {c.get('source', '')})"),
        ("preference samples", f"{c.get('pref_count')}" + (f" ({100 * c['pref_fraction']:g}% of the data)"
                                                           if c.get("pref_fraction") else "")),
        ("n_test", c.get("n_test")),
        *([("setting", rename_text(c))] if c.get("rename") else []),
        ("seed", c.get("seed")),
        ("bank temperature", c.get("bank_temperature")),
        ("label choice", c.get("scoring")),
        ("methods", ", ".join(c.get("methods", []))),
        ("wall time", f"{run.get('wall_time_s', 0):.1f} s"),
        ("LLM calls", _calls_text(calls)),
        ("finished", run.get("finished", "")),
    ]
    code = (obj.get("request") or {}).get("code")
    if code:
        from . import __version__
        rows.append(("cm_core", f"{__version__} (library code {code})"))
    if run.get("reused_from"):
        rows.append(("results", f"reused from {run['reused_from']} (same configuration and library code)"))
    for pkg, ver in (run.get("versions") or {}).items():
        rows.append((f"version: {pkg}", ver))
    return pd.DataFrame(rows, columns=["field", "value"]).astype({"value": str})


def _protocol_text(config: Mapping[str, Any]) -> str:
    """Which protocol made the numbers, and where a paper-protocol run departs from the official code."""
    protocol = config.get("protocol", "ours")
    if protocol == "paper":
        departures = config.get("departures") or []
        return ("paper (the official code's splits, prompts, decoding, strict scoring, one shared zero-shot bank)"
                + ("; departs from it: " + " | ".join(departures) if departures else ""))
    return "ours (calibrated scoring, soft CM, de-duplicated splits)"


def rename_text(config: Mapping[str, Any]) -> str:
    """The vocabulary-misalignment setting a run was made in (cm_core/misalign.py)."""
    how = {"codes": "opaque codes", "nicknames": "nicknames that are unrelated real words"}.get(config["rename"],
                                                                                             config["rename"])
    return (f"vocabulary misalignment: the user's labels renamed to {how} (seeded); own_words answers in the "
            "dataset's original label names, own_words_free in free text, and CM maps them onto the user's names")


def _calls_text(calls: Mapping[str, Any]) -> str:
    if not calls:
        return "0 (no LLM)"
    score, gen, hits = calls.get("score_calls", 0), calls.get("generate_calls", 0), calls.get("cache_hits", 0)
    return f"{score + gen} computed ({score} score, {gen} generate), {hits} answered from the response cache"


def verdict(results: Mapping[str, Any]) -> str:
    """One plain sentence: which method wins on this dataset, by how much, against the best of the other kind."""
    df = results_frame(results)
    ds = results["config"].get("dataset", "this dataset")
    n = results["config"].get("n_test")
    if df.empty:
        return f"No method was evaluated on {ds}."
    df = df.sort_values("accuracy", ascending=False, kind="stable").reset_index(drop=True)
    win = df.iloc[0]
    ties = df[df["accuracy"] == win["accuracy"]]["method"].tolist()
    if len(ties) > 1:
        head = (f"On {ds} (n_test={n}), {' and '.join(ties)} tie for best at {fmt_acc(win['accuracy'])}% accuracy "
                f"(95% CI {fmt_ci([win['ci_low'], win['ci_high']])})")
    else:
        head = (f"On {ds} (n_test={n}), {win['method']} wins with {fmt_acc(win['accuracy'])}% accuracy "
                f"(95% CI {fmt_ci([win['ci_low'], win['ci_high']])})")
    rest = df[~df["method"].isin(ties)]
    if rest.empty:
        return head + "."
    second = rest.iloc[0]
    gap = 100 * (win["accuracy"] - second["accuracy"])
    overlap = second["ci_high"] >= win["ci_low"]
    tail = (f", {gap:.1f} points ahead of {second['method']} ({fmt_acc(second['accuracy'])}%"
            f"{'; the 95% CIs overlap' if overlap else '; the 95% CIs do not overlap'})")
    other_kind = "baseline" if win["kind"] == "llm" else "llm"
    others = rest[rest["kind"] == other_kind]
    if not others.empty and others.iloc[0]["method"] != second["method"]:
        o = others.iloc[0]
        what = "best baseline" if other_kind == "baseline" else "best LLM method"
        tail += (f" and {100 * (win['accuracy'] - o['accuracy']):.1f} points ahead of the {what}, "
                 f"{o['method']} ({fmt_acc(o['accuracy'])}%)")
    return head + tail + "."


def p_equals(p: float) -> str:
    """``=0.031`` or ``<0.001``: a p-value after the letter p."""
    text = fmt_p(p)
    return text if text.startswith("<") else f"={text}"


def cm_verdict(results: Mapping[str, Any]) -> str:
    """One plain sentence: did CM beat its base here, and by how much (every CM variant against its base, on the
    same queries; significant = exact McNemar p < 0.05)."""
    pairs = [(m, r) for m, r in _scored(results).items() if r.get("p_value") is not None]
    if not pairs:
        return "No CM variant was evaluated."
    better = [(m, r) for m, r in pairs if is_significant(r)]
    worse = [(m, r) for m, r in pairs if r["p_value"] < ALPHA and r["delta"] < 0]
    deltas = [100 * r["delta"] for _, r in pairs]

    def listed(items):
        return ", ".join(f"{m} {100 * r['delta']:+.1f} (p{p_equals(r['p_value'])})" for m, r in items)

    text = (f"CM against its base, {len(pairs)} comparisons: Δ from {min(deltas):+.1f} to {max(deltas):+.1f} "
            "points; ")
    if not better and not worse:
        return text + "no significant change."
    parts = []
    if better:
        parts.append(f"significantly better in {len(better)} ({listed(better)})")
    if worse:
        parts.append(f"significantly worse in {len(worse)} ({listed(worse)})")
    return text + "; ".join(parts) + "."


def cm_actions(results: Mapping[str, Any]) -> pd.DataFrame:
    """What each CM variant did per test query: kept the base answer, mapped it, or asked again among candidates."""
    rows = []
    for name, r in _scored(results).items():
        if "actions" not in r:
            continue
        n = max(1, r.get("n") or sum(r["actions"].values()))
        row = {"method": name, "base": r.get("base")}
        for a in ("keep", "map", "choose", "soft"):
            if a in r["actions"] or a != "soft":
                row[a] = r["actions"].get(a, 0)
        row["second-call rate"] = f"{100 * r.get('second_call_rate', 0):.0f}%"
        row["changed answers"] = sum(1 for x, y in zip(results["predictions"].get(r.get("base"), []),
                                                      results["predictions"].get(name, [])) if x != y)
        row["n"] = n
        rows.append(row)
    return pd.DataFrame(rows).fillna(0)


# --------------------------------------------------------------------------- one run: figures

def _figure(w: float, h: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(w, h), layout="constrained")


def accuracy_figure(results: Mapping[str, Any]):
    """Accuracy per method with the same 95% bootstrap CIs as the table; colour = base method or CM variant."""
    import seaborn as sns
    df = results_frame(results)
    fig = _figure(7.5, 0.42 * max(3, len(df)) + 1.2)
    ax = fig.add_subplot()
    if df.empty:
        ax.text(0.5, 0.5, "no results", ha="center")
        return fig
    df = df.assign(pct=100 * df["accuracy"])
    palette = {v: VARIANT_COLORS[v] for v in df["variant"].unique()}
    sns.barplot(data=df, y="method", x="pct", hue="variant", hue_order=[v for v in VARIANT_ORDER if v in palette],
                palette=palette, dodge=False, errorbar=None, ax=ax, order=list(df["method"]))
    ax.errorbar(x=df["pct"], y=range(len(df)), xerr=[df["pct"] - 100 * df["ci_low"], 100 * df["ci_high"] - df["pct"]],
                fmt="none", ecolor="black", capsize=3, lw=1)
    for i, (pct, sig) in enumerate(zip(df["pct"], df["significant"])):
        ax.text(min(pct, 100) + 1, i, f"{pct:.1f}{' *' if sig else ''}", va="center", ha="left", fontsize=8)
    n_llm = int((df["kind"] == "llm").sum())
    if 0 < n_llm < len(df):
        ax.axhline(n_llm - 0.5, color="0.6", lw=0.8, ls="--")
    c = results["config"]
    ax.set(xlim=(0, 112), xlabel="accuracy (%) with 95% CI", ylabel="",
           title=f"{c.get('dataset')} · {model_name(c)} · n_test={c.get('n_test')} · {c.get('pref_count')} "
                 f"preference samples")
    ax.title.set_fontsize(9)
    ax.legend(title="", loc="lower right", fontsize=8)
    return fig


def per_label_gains(results: Mapping[str, Any], method: str | None = None) -> pd.DataFrame:
    """Per gold label: queries, accuracy of the base and of each CM variant (or just ``method``), and the gain."""
    gold = results["gold"]
    preds = results["predictions"]
    rows = []
    for name, r in _scored(results).items():
        base = r.get("base")
        if base is None or (method and name != method) or name not in preds or base not in preds:
            continue
        by_label: dict[str, list[int]] = {}
        for g, b, m in zip(gold, preds[base], preds[name]):
            s = by_label.setdefault(g, [0, 0, 0])
            s[0] += 1
            s[1] += b == g
            s[2] += m == g
        for lab, (n, cb, cm) in by_label.items():
            rows.append({"method": name, "base": base, "label": lab, "n": n, "base_acc": cb / n, "cm_acc": cm / n,
                         "gain": (cm - cb) / n, "net_correct": cm - cb})
    df = pd.DataFrame(rows, columns=["method", "base", "label", "n", "base_acc", "cm_acc", "gain", "net_correct"])
    return df.sort_values(["method", "gain", "n"], ascending=[True, False, False], kind="stable").reset_index(drop=True)


def per_label_gain_figure(results: Mapping[str, Any], top: int = 20):
    """Per-label accuracy gain (points) of each CM variant over its base: one panel per variant, the ``top`` labels
    whose accuracy changed most (labels CM left unchanged are not drawn)."""
    import seaborn as sns
    df = per_label_gains(results)
    names = method_order(df["method"].unique()) if not df.empty else []
    changed = {n: df[(df["method"] == n) & (df["net_correct"] != 0)] for n in names}
    if not names:
        return _message_figure("no CM variant evaluated")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    height = max(3, min(top, max(len(d) for d in changed.values())))
    fig = _figure(4.4 * cols, (0.3 * height + 1.3) * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        r = results["results"][name]
        ax.set_title(f"{name} vs {r['base']}: {100 * r['delta']:+.1f} points overall", fontsize=9)
        d = changed[name]
        if d.empty:
            ax.text(0.5, 0.5, "no label's accuracy changed", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        d = d.reindex(d["gain"].abs().sort_values(ascending=False, kind="stable").index).head(top)
        d = d.sort_values("gain", ascending=False, kind="stable").assign(
            pts=lambda x: 100 * x["gain"], sign=lambda x: ["gain" if g > 0 else "loss" for g in x["gain"]],
            label_n=lambda x: [f"{lab if len(lab) <= 28 else lab[:27] + '…'} (n={n})"
                               for lab, n in zip(x["label"], x["n"])])
        sns.barplot(data=d, y="label_n", x="pts", hue="sign", dodge=False, errorbar=None, ax=ax,
                    palette={"gain": "#2ca02c", "loss": "#d62728"}, legend=False)
        ax.axvline(0, color="black", lw=0.8)
        lim = max(5.0, float(d["pts"].abs().max()) * 1.1)
        ax.set(xlabel="accuracy gain on the label's test queries (points)", ylabel="", xlim=(-lim, lim))
        ax.tick_params(axis="y", labelsize=7)
    return fig


def _message_figure(text: str):
    fig = _figure(5, 1.2)
    ax = fig.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center")
    ax.set_axis_off()
    return fig


# --------------------------------------------------------------------------- memory bank

def _pairs_counts(data) -> dict[str, dict[str, int]]:
    """Counts response -> label -> n from a MemoryBank, its dict, or (response, label) pairs."""
    from .bank import MemoryBank
    if isinstance(data, MemoryBank):
        return data.counts
    if isinstance(data, Mapping) and data.get("format") == "cm-memory-bank":
        return data["counts"]
    if isinstance(data, Mapping) and "bank" in data and isinstance(data["bank"], Mapping):
        return _pairs_counts(data["bank"])
    out: dict[str, dict[str, int]] = {}
    for resp, lab in data:
        row = out.setdefault(resp, {})
        row[lab] = row.get(lab, 0) + 1
    return out


def discrepancy_matrix(data, top: int = 20) -> pd.DataFrame:
    """Counts of (base response, user label), the ``top`` most frequent responses (rows) and labels (columns);
    rows sorted so that each response sits near the label it most often means (a readable diagonal)."""
    counts = _pairs_counts(data)
    resp_tot = Counter({r: sum(row.values()) for r, row in counts.items()})
    lab_tot: Counter = Counter()
    for row in counts.values():
        lab_tot.update(row)
    labels = [lab for lab, _ in sorted(lab_tot.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    resps = [r for r, _ in sorted(resp_tot.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]
    m = pd.DataFrame(0, index=resps, columns=labels, dtype=int)
    for r in resps:
        for lab, c in counts[r].items():
            if lab in m.columns:
                m.loc[r, lab] = c
    col_pos = {lab: i for i, lab in enumerate(labels)}
    m = m.loc[sorted(resps, key=lambda r: (col_pos.get(_argmax(counts[r], labels), len(labels)), -resp_tot[r], r))]
    m.index.name, m.columns.name = "base response", "user label"
    return m


def _argmax(row: Mapping[str, int], allowed: Sequence[str]) -> str | None:
    cand = [(c, lab) for lab, c in row.items() if lab in allowed]
    return max(cand, key=lambda t: (t[0], t[1]))[1] if cand else None


def discrepancy_heatmap(data, top: int = 20, title: str | None = None):
    """Heatmap of base response (what the model says) against the user's label (what the user meant).
    Cells where response == label are outlined: the base already agrees with the user there."""
    import seaborn as sns
    from matplotlib.patches import Rectangle
    m = discrepancy_matrix(data, top)
    counts = _pairs_counts(data)
    fig = _figure(max(5.0, 0.42 * len(m.columns) + 3.5), max(3.0, 0.34 * len(m.index) + 2.5))
    ax = fig.add_subplot()
    if m.empty:
        ax.text(0.5, 0.5, "empty bank", ha="center", va="center")
        ax.set_axis_off()
        return fig
    short = lambda s: s if len(s) <= 30 else s[:28] + "…"  # noqa: E731
    annot = m.astype(str).where(m > 0, "") if m.shape[0] * m.shape[1] <= 900 else False
    sns.heatmap(m, ax=ax, cmap="Blues", annot=annot, fmt="", cbar_kws={"label": "count"},
                linewidths=0.3, linecolor="0.9", xticklabels=[short(c) for c in m.columns],
                yticklabels=[short(r) for r in m.index], annot_kws={"fontsize": 7})
    for i, r in enumerate(m.index):
        if r in m.columns:
            ax.add_patch(Rectangle((list(m.columns).index(r), i), 1, 1, fill=False, edgecolor="#d62728", lw=1.2))
    n_resp, n_lab = len(counts), len({lab for row in counts.values() for lab in row})
    ax.set_title(title or f"base response vs user label (top {len(m.index)} of {n_resp} responses, "
                          f"{len(m.columns)} of {n_lab} labels)", fontsize=9)
    ax.tick_params(axis="x", labelsize=7, rotation=90)
    ax.tick_params(axis="y", labelsize=7, rotation=0)
    return fig


def bank_summary(insp: Mapping[str, Any]) -> pd.DataFrame:
    """Size and coverage of the bank (see :func:`cm_core.experiments.inspect_bank`)."""
    s, cov = insp["stats"], insp["coverage"]
    rows = [
        ("base method", insp["method"]),
        ("preference samples in the bank", s["samples"]),
        ("bank entries (distinct base responses)", s["entries"]),
        ("entries with one candidate label / several", f"{s['single_candidate']} / {s['multi_candidate']}"),
        ("user labels covered", f"{cov['labels_covered']} of {cov['n_labels']} ({100 * cov['label_coverage']:.1f}%)"),
        ("samples where base response = user label", f"{100 * s['agreement']:.1f}%"),
        ("test queries whose base answer is in the bank", f"{100 * cov['test_coverage']:.1f}% "
                                                          f"({cov['test_hits']} of {cov['n_test']})"),
        ("  … mapped to the single candidate", cov["test_map"]),
        ("  … re-asked among several candidates", cov["test_choose"]),
        ("  … unseen, base answer kept", cov["test_keep"]),
        ("bank source", insp.get("source", "")),
    ]
    return pd.DataFrame(rows, columns=["", "value"]).astype({"value": str})


def bank_sentence(insp: Mapping[str, Any]) -> str:
    s, cov = insp["stats"], insp["coverage"]
    c = insp["config"]
    return (f"The {insp['method']} memory bank for {c.get('dataset')} holds {s['samples']} preference samples "
            f"under {s['entries']} distinct base responses and covers {cov['labels_covered']} of {cov['n_labels']} "
            f"user labels; the base response equals the user's label for {100 * s['agreement']:.1f}% of them, and "
            f"{100 * cov['test_coverage']:.1f}% of the {cov['n_test']} test queries get a base answer the bank knows.")


def bank_table(insp: Mapping[str, Any], top: int = 40) -> pd.DataFrame:
    """The bank's entries, most frequent responses first: response, its candidate labels with counts, p(y|ŷ)."""
    from .bank import MemoryBank
    bank = MemoryBank.from_dict(insp["bank"])
    rows = sorted(bank.counts, key=lambda r: (-sum(bank.counts[r].values()), r))[:top]
    out = []
    for r in rows:
        cond = bank.conditional(r)
        out.append({"base response": r, "samples": sum(bank.counts[r].values()),
                    "user labels (count, p)": "; ".join(f"{lab} ({c}, {cond[lab]:.2f})"
                                                       for lab, c in bank.candidates(r).items())})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- a grid of runs

def grid_frame(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Long table over finished runs: one row per (model, pref, dataset, method)."""
    rows = []
    for run in runs:
        res = run.get("results")
        if not res:
            continue
        c = res["config"]
        for name, r in _scored(res).items():
            rows.append({"run": run["id"], "model": run.get("model") or model_name(c), "dataset": c["dataset"],
                         "pref_fraction": c.get("pref_fraction"), "pref_count": c.get("pref_count"),
                         "pref": run.get("pref", ""), "pref_mode": run.get("pref_mode", "fraction"), "method": name, "kind": r.get("kind"),
                         "accuracy": r["accuracy"], "ci_low": r["ci95"][0], "ci_high": r["ci95"][1],
                         "p_value": r.get("p_value"), "delta": r.get("delta"), "significant": is_significant(r),
                         "n_test": c.get("n_test")})
    return pd.DataFrame(rows)


def paper_table_html(runs: Sequence[Mapping[str, Any]], link=lambda run: None) -> str:
    """HTML tables in the paper's layout, one per (model, preference setting): methods × datasets, accuracy with
    95% CI; significant CM improvements in bold; each dataset header links to its run's report."""
    ok = [r for r in runs if r.get("results")]
    if not ok:
        return "<p>No finished runs.</p>"
    groups: dict[tuple, list] = {}
    for r in ok:
        groups.setdefault((r["model"], r["pref"]), []).append(r)
    parts = []
    for (model, pref), group in groups.items():
        datasets = list(dict.fromkeys(r["dataset"] for r in group))
        by_ds = {r["dataset"]: r for r in group}
        methods = method_order({m for r in group for m in _scored(r["results"])})
        head = "".join(f"<th>{_a(link(by_ds[d]), html.escape(d))}<br><small>n={by_ds[d]['results']['config']['n_test']}"
                       f"</small></th>" for d in datasets)
        lines = [f"<h3>{html.escape(model)} · preference samples: {html.escape(pref)}</h3>",
                 "<table class='paper'><thead><tr><th>method</th>" + head + "<th>mean</th></tr></thead><tbody>"]
        for m in methods:
            base, variant = split_method_name(m)
            cls = " class='variant'" if variant else ""
            sep = " class='sep'" if base in BASELINES and not variant and m == next(
                (x for x in methods if split_method_name(x)[0] in BASELINES), None) else ""
            cells, accs = [], []
            for d in datasets:
                r = _scored(by_ds[d]["results"]).get(m)
                if r is None:
                    cells.append("<td>–</td>")
                    continue
                accs.append(r["accuracy"])
                txt = f"{fmt_acc(r['accuracy'])} <small>{fmt_ci(r['ci95'])}</small>"
                title = ""
                if "p_value" in r:
                    title = f" title='Δ {100 * r['delta']:+.1f} points vs {r['base']}, p={fmt_p(r['p_value'])}'"
                if is_significant(r):
                    txt = f"<b>{txt}</b>"
                cells.append(f"<td{title}>{txt}</td>")
            mean = fmt_acc(sum(accs) / len(accs)) if len(accs) == len(datasets) and accs else "–"
            label = html.escape(variant or m)
            lines.append(f"<tr{sep}><th{cls}>{label}</th>{''.join(cells)}<td>{mean}</td></tr>")
        lines.append("</tbody></table>")
        parts.append("\n".join(lines))
    return "\n".join(parts)


def _a(href: str | None, text: str) -> str:
    return f"<a href='{html.escape(href)}'>{text}</a>" if href else text


def fraction_figure(runs: Sequence[Mapping[str, Any]]):
    """Accuracy against the preference fraction (one panel per dataset), with 95% CI bands; None unless the grid
    has at least two fractions for some dataset."""
    import seaborn as sns
    df = grid_frame(runs)
    if df.empty or "pref_fraction" not in df:
        return None
    df = df[df["pref_mode"] == "fraction"]
    if df.empty or df.groupby(["model", "dataset"])["pref_fraction"].nunique().max() < 2:
        return None
    datasets = list(dict.fromkeys(df["dataset"]))
    models = list(dict.fromkeys(df["model"]))
    cols = min(3, len(datasets))
    rows = math.ceil(len(datasets) / cols) * len(models)
    fig = _figure(4.6 * cols, 3.4 * rows)
    methods = method_order(df["method"].unique())
    palette = dict(zip(methods, sns.color_palette("tab10", len(methods))))
    i = 0
    for model in models:
        for d in datasets:
            i += 1
            ax = fig.add_subplot(rows, cols, i)
            sub = df[(df["dataset"] == d) & (df["model"] == model)].sort_values("pref_fraction")
            for m in methods:
                s = sub[sub["method"] == m]
                if s.empty:
                    continue
                x = 100 * s["pref_fraction"]
                ax.plot(x, 100 * s["accuracy"], marker="o", color=palette[m], label=m,
                        ls="--" if s["kind"].iloc[0] == "baseline" else "-")
                ax.fill_between(x, 100 * s["ci_low"], 100 * s["ci_high"], color=palette[m], alpha=0.12)
            ax.set(title=f"{d} · {model}", xlabel="preference samples (% of the data)", ylabel="accuracy (%)")
            ax.title.set_fontsize(9)
            ax.set_xticks(sorted(set(100 * sub["pref_fraction"])))
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    return fig


def figure_png_base64(fig, dpi: int = 110) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- notebooks to HTML

def notebook_to_html(nb_path, html_path, title: str | None = None) -> None:
    """Render an executed notebook to a self-contained HTML report without code cells (nbconvert)."""
    import nbformat
    from nbconvert import HTMLExporter
    from pathlib import Path
    nb = nbformat.read(str(nb_path), as_version=4)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title or Path(nb_path).stem}})
    Path(html_path).write_text(body, encoding="utf-8")


# --------------------------------------------------------------------------- files a spreadsheet opens

FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\uff1d", "\uff0b", "\uff0d", "\uff20")  # also full-width forms


def spreadsheet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` whose text cells a spreadsheet shows as text instead of running them as formulas
    (CSV injection: ``=HYPERLINK(...)``, ``=1+1``, ``@SUM(...)``): a cell starting with = + - @, a tab or a carriage
    return (or their full-width forms) gets a leading apostrophe. Numbers are left alone. Column names too."""
    def safe(v):
        return "'" + v if isinstance(v, str) and v.startswith(FORMULA_START) else v
    out = frame.copy()
    out.columns = [safe(str(c)) for c in out.columns]
    for c in out.columns:
        if not pd.api.types.is_numeric_dtype(out[c]):
            out[c] = out[c].map(safe)
    return out
