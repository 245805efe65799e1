"""The report notebooks and the grid runner (cm_core.experiments: notebook_api, fingerprint, grid, index_page;
cm_core.report).

The end-to-end test executes the tiny CI grid (notebooks/grids/ci.json: the embedded model, two datasets, 15 test
queries) with papermill into tmp_path, from a working directory outside the repository, and checks that the HTML
reports and index.html show the numbers of each run's results JSON.
"""
from __future__ import annotations

import functools
import html
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from cm_core import experiments, registry, report
from cm_core.errors import CMError
from cm_core.experiments import fingerprint

REPO = Path(__file__).resolve().parents[1]
GRIDS = REPO / "notebooks" / "grids"
CI_GRID = GRIDS / "ci.json"
NOTEBOOK_PARAMS = {"model", "base_url", "dataset", "pref_fraction", "pref_count", "temperature", "n_test", "methods",
                   "seed", "decoding", "list_labels", "calibrate", "protocol", "n_test_other", "rename", "cache_dir", "results_path",
                   "reuse", "repo_root"}


def run_cli(*args, cwd: Path, timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m cm_core.experiments`` from ``cwd`` (outside the repository: cm_core comes from PYTHONPATH)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "cm_core.experiments", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc, time.time() - t0


def esc(text: str) -> str:
    """How nbconvert / our index write a string into HTML."""
    return html.escape(text, quote=False)


# --------------------------------------------------------------------------- grids and notebooks (fast)

def test_grid_files_parse_and_expand():
    ci = experiments.load_grid(CI_GRID)
    cells = experiments.expand_grid(ci)
    assert [c["id"] for c in cells] == ["embedded_massive_scenario_n10", "embedded_banking77_n10"]
    assert ci["n_test"] <= 20 and all(c["params"]["pref_count"] <= 20 for c in cells)
    assert {"zero_shot", "label_similarity", "knn", "logreg"} <= set(ci["methods"])

    emb = experiments.load_grid(GRIDS / "embedded.json")
    cells = experiments.expand_grid(emb)
    assert sorted({c["dataset"] for c in cells}) == ["banking77", "clinc", "massive_scenario", "mtop_intent",
                                                     "stackexchange"]
    assert emb["n_test"] == 200 and emb["pref_fractions"] == [0.01, 0.05] and emb["seed"] == 40
    assert emb["cache_dir"] == ".cm_cache" and emb["models"] == ["embedded:bfloat16"]
    assert {"zero_shot", "zero_shot+cm_paper", "zero_shot+cm_soft", "zero_shot+cm_shrunk", "zero_shot+cm_soft_shrunk",
            "label_similarity", "label_similarity+cm_shrunk", "knn+cm_shrunk", "logreg+cm_shrunk"} <= set(emb["methods"])
    assert cells[0]["id"] == "embedded-bfloat16_banking77_0.01"

    # the ours-protocol cells to read beside the paper grid: same model, datasets, bank sizes and base methods
    paper, beside = (experiments.load_grid(GRIDS / f) for f in ("paper.json", "paper_ours.json"))
    assert paper["protocol"] == "paper" and beside.get("protocol", "ours") == "ours"
    for key in ("models", "datasets", "pref_fractions", "seed"):
        assert paper[key] == beside[key], key
    bases = lambda g: {registry.split_method_name(m, g.get("protocol", "ours"))[0] for m in g["methods"]}
    assert bases(paper) == bases(beside) == {"zero_shot", "few_shot", "cot", "self_consistency"}
    assert "zero_shot+cm_shrunk" in paper["methods"] and "cot+cm_shrunk" in beside["methods"]

    frac = experiments.expand_grid(experiments.load_grid(GRIDS / "fractions.json"))
    assert {c["params"]["pref_fraction"] for c in frac} == {0.01, 0.02, 0.05}


@pytest.mark.parametrize("grid, message", [
    ({"datasets": ["banking77"], "modles": ["embedded"]}, "unknown key"),
    ({"datasets": []}, "datasets"),
    ({"datasets": ["banking77"], "methods": ["zero_shot+cmm"]}, "unknown method"),
    ({"datasets": ["banking77"], "pref_fractions": [0]}, "pref_fractions"),
    ({"datasets": ["banking77"], "pref_counts": [2.5]}, "pref_counts"),
    ([1, 2], "JSON object"),
])
def test_bad_grids_are_refused(grid, message):
    with pytest.raises(CMError, match=message):
        experiments.check_grid(grid)


def test_grid_ids_are_safe_file_names():
    g = experiments.check_grid({"models": ["openai:gpt-4o-mini", "hf:meta-llama/Llama-3-8B"],
                                "datasets": ["banking77"], "pref_fractions": [0.01, 0.05], "pref_counts": [8]})
    ids = [c["id"] for c in experiments.expand_grid(g)]
    assert ids[:3] == ["openai-gpt-4o-mini_banking77_0.01", "openai-gpt-4o-mini_banking77_0.05",
                       "openai-gpt-4o-mini_banking77_n8"]
    assert "hf-meta-llama-Llama-3-8B_banking77_0.01" in ids
    assert all("/" not in i and ":" not in i for i in ids)


@pytest.mark.parametrize("name, extra", [("evaluate", set()), ("bank", {"bank_method"})])
def test_notebooks_are_parameterized_and_thin(name, extra):
    import papermill as pm
    path = REPO / "notebooks" / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert set(pm.inspect_notebook(str(path))) == NOTEBOOK_PARAMS | extra
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type != "code" or cell is tagged[0]:
            continue
        assert all(o == [] for o in [cell.get("outputs", [])]), "notebooks are committed without outputs"
        for line in cell.source.splitlines():  # no logic hidden in notebooks: only calls into cm_core
            assert not line.lstrip().startswith(("def ", "class ", "for ", "while ", "lambda")), line


def test_results_reuse_needs_the_same_request(tmp_path):
    kw = dict(model="embedded", dataset="x", pref_fraction=0.05, pref_count=None, temperature=0.7, n_test=5,
              methods=["knn"], seed=1, decoding="score", list_labels=False, calibrate=True, base_url=None)
    req = experiments.make_request(**kw)
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"request": req, "results": {}, "run": {}}))
    assert experiments.load_reusable(path, req)["run"]["reused_from"] == str(path)
    assert experiments.load_reusable(path, experiments.make_request(**{**kw, "seed": 2})) is None
    assert experiments.load_reusable(path, experiments.make_request(**{**kw, "list_labels": None})) is None
    assert experiments.load_reusable(tmp_path / "missing.json", req) is None
    assert experiments.make_request(dataset="x", methods="knn, logreg")["methods"] == ["knn", "logreg"]
    assert experiments.make_request(dataset="x", pref_count=8)["pref_fraction"] is None  # the count wins
    for bad, message in (({"methods": ["nope"]}, "unknown method"), ({"decoding": "beam"}, "decoding"),
                         ({"list_labels": "yes"}, "list_labels"), ({"methods": ""}, "no methods")):
        with pytest.raises(CMError, match=message):
            experiments.make_request(dataset="x", **bad)


def test_grid_list_labels_defaults_to_auto_and_is_checked():
    g = experiments.check_grid({"datasets": ["banking77"]})
    assert g["list_labels"] is None and experiments.expand_grid(g)[0]["params"]["list_labels"] is None
    assert experiments.check_grid({"datasets": ["banking77"], "list_labels": False})["list_labels"] is False
    for bad in ({"list_labels": 1}, {"calibrate": "no"}, {"decoding": "beam"}, {"bank_method": "knn+cm"}):
        with pytest.raises(CMError):
            experiments.check_grid({"datasets": ["banking77"], **bad})


def test_fingerprint_covers_the_library_and_the_stamp_the_presentation(tmp_path, monkeypatch):
    """Results are recomputed after a change of the library only; notebooks run again after any change that
    shapes a report (this package and its template, report.py, the notebooks)."""
    lib, nbs = tmp_path / "cm_core", tmp_path / "notebooks"
    files = ["methods.py", "backends/hf.py", "report.py", "cli.py", "__main__.py", "experiments/grid.py",
             "experiments/templates/index.html.j2"]
    for f in files:
        (lib / f).parent.mkdir(parents=True, exist_ok=True)
        (lib / f).write_text("x = 1\n")
    nbs.mkdir()
    for name in experiments.NOTEBOOKS:
        (nbs / f"{name}.ipynb").write_text("{}")
    monkeypatch.setattr(fingerprint, "LIBRARY", lib)
    monkeypatch.setattr(fingerprint, "PACKAGE", lib / "experiments")
    monkeypatch.setattr(fingerprint, "PRESENTATION", (lib / "report.py", lib / "cli.py", lib / "__main__.py"))
    params = {"dataset": "x", "seed": 1, "cache_dir": "/somewhere", "reuse": True}

    def hashes():
        return fingerprint.code_fingerprint(), fingerprint.run_stamp(params, nbs)

    for f in [*files, "../notebooks/bank.ipynb"]:
        code, stamp = hashes()
        (lib / f).write_text((lib / f).read_text() + "# edited\n")
        code2, stamp2 = hashes()
        assert (code2 != code) == (f in ("methods.py", "backends/hf.py")), f
        assert (stamp2 != stamp) == (f not in ("cli.py", "__main__.py")), f  # the command lines shape neither
    code, stamp = hashes()
    assert fingerprint.run_stamp({**params, "cache_dir": "/elsewhere", "reuse": False}, nbs) == stamp
    assert fingerprint.run_stamp({**params, "seed": 2}, nbs) != stamp
    (lib / "experiments" / "__pycache__").mkdir()
    (lib / "experiments" / "__pycache__" / "grid.cpython-311.pyc").write_bytes(b"compiled")
    assert hashes() == (code, stamp)  # byte code is no source


def test_inspect_bank_without_results_is_the_evaluations_bank(tmp_path, monkeypatch):
    """No results JSON: inspect_bank runs the same evaluation for its base method alone and shows the bank that
    evaluation's CM variants use, on the same split (and writes nothing to results_path)."""
    monkeypatch.setattr(experiments.notebook_api, "code_fingerprint", lambda: "fixed")  # others may edit cm_core
    kw = dict(dataset="massive_scenario", pref_count=12, n_test=6, seed=3, methods=["label_similarity", "knn"],
              cache_dir=tmp_path / "cache")
    path = tmp_path / "results.json"
    res = experiments.evaluate_run(**kw, results_path=path)
    assert set(res["banks"]) == {"label_similarity", "knn"}
    for method in ("knn", "label_similarity"):
        alone = experiments.inspect_bank(**kw, bank_method=method)
        assert alone["source"] == "evaluated" and alone["config"]["methods"] == [method]
        assert alone["bank"]["counts"] == res["banks"][method]["bank"]["counts"], method
        assert alone["stats"] == res["banks"][method]["stats"]
        assert alone["test_pairs"] == [[b, g] for b, g in zip(res["predictions"][method], res["gold"])]
        assert alone["config"]["pref_count"] == 12 and alone["config"]["n_test"] == 6
        reused = experiments.inspect_bank(**kw, bank_method=method, results_path=path)
        assert reused["source"] == "results" and reused["run"]["reused_from"] == str(path)
        assert {k: reused[k] for k in ("bank", "stats", "coverage", "test_pairs")} == \
               {k: alone[k] for k in ("bank", "stats", "coverage", "test_pairs")}
    assert json.loads(path.read_text())["config"]["methods"] == ["label_similarity", "knn"]  # not overwritten
    assert experiments.inspect_bank(**kw, results_path=path)["method"] == "label_similarity"  # no LLM method
    assert experiments.default_bank_method(["knn", "zero_shot_knn+cm_soft", "zero_shot"]) == "zero_shot_knn"


def test_a_failing_run_keeps_its_notebook_and_is_reported(tmp_path, capsys, monkeypatch):
    """A cell error fails the run, not the grid: the executed notebook is kept and rendered, index.html says why,
    the exit status is 1. (Stand-in notebooks that fail at once, so no time goes into importing the library.)"""
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name in experiments.NOTEBOOKS:
        params = nbformat.v4.new_code_cell("dataset = None")
        params.metadata["tags"] = ["parameters"]
        body = 'raise ValueError(f"no such dataset: {dataset}")' if name == "evaluate" else "print('bank')"
        nbformat.write(nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(body)],
                                                metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                         "display_name": "Python 3"}}),
                       nbs / f"{name}.ipynb")
    grid = tmp_path / "bad.json"
    grid.write_text(json.dumps({"name": "bad", "datasets": ["ds_a", "ds_b"], "pref_counts": [3], "n_test": 3,
                                "methods": ["knn"], "timeout": 120}))
    monkeypatch.chdir(tmp_path)
    rc = experiments.main(["--grid", str(grid), "--out", "out", "--notebooks", str(nbs), "--only", "ds_a"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "FAILED embedded_ds_a_n3" in err and "no such dataset: ds_a" in err
    run_dir = tmp_path / "out" / "runs" / "embedded_ds_a_n3"
    nb = nbformat.read(run_dir / "evaluate.ipynb", as_version=4)  # kept although a cell failed
    assert nb.metadata.papermill["exception"] is True
    assert not (run_dir / "bank.ipynb").exists()  # not run after a failed evaluation
    assert "no such dataset: ds_a" in (tmp_path / "out" / "embedded_ds_a_n3_evaluate.html").read_text()
    index = (tmp_path / "out" / "index.html").read_text()
    assert "failed" in index and "no such dataset: ds_a" in index and "embedded_ds_b" not in index  # never ran
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "failed" and "ValueError" in rec["error"]


# --------------------------------------------------------------------------- report helpers on synthetic results (fast)

@functools.lru_cache(maxsize=None)
def fake_results(dataset="toy", frac=0.05, base_right=(1, 0, 0, 0, 1, 0, 0, 0), cm_right=(1, 1, 1, 1, 1, 1, 1, 0),
                 baseline_right=(1, 1, 0, 0, 1, 1, 0, 0)):
    """A results dict shaped like run_evaluation's, from which test queries each method got right."""
    from cm_core.evaluate import accuracy, bootstrap_ci, mcnemar_p
    gold = [f"label {i % 3}" for i in range(len(base_right))]
    wrong = "nonsense"
    preds = {"zero_shot": [g if ok else wrong for g, ok in zip(gold, base_right)],
             "zero_shot+cm": [g if ok else wrong for g, ok in zip(gold, cm_right)],
             "knn": [g if ok else wrong for g, ok in zip(gold, baseline_right)]}
    results = {}
    for name, p in preds.items():
        acc = accuracy(gold, p)  # (summarize's macro-F1 bootstrap is slow; the reports need accuracy and its CI)
        results[name] = {"accuracy": acc, "macro_f1": acc, "ci95": bootstrap_ci(gold, p, n_resamples=200), "n": len(gold),
                         "kind": "baseline" if name == "knn" else "llm"}
    zs, cm = results["zero_shot"], results["zero_shot+cm"]
    cm.update(p_value=mcnemar_p(gold, preds["zero_shot"], preds["zero_shot+cm"]), base="zero_shot",
              delta=cm["accuracy"] - zs["accuracy"], actions={"keep": 2, "map": 3, "choose": 3},
              second_call_rate=3 / 8)
    results["zero_shot+cm_soft"] = {"skipped": "no p(y|x)"}
    return {"version": 1, "config": {"dataset": dataset, "source": "mem", "n_labels": 3, "model": {"kind": "embedded",
            "model": "Tiny"}, "methods": ["zero_shot", "knn"], "pref_fraction": frac, "pref_count": 4, "n_test": 8,
            "seed": 40, "bank_temperature": 0.7, "scoring": "score"},
            "results": results, "banks": {}, "gold": gold, "texts": [f"q{i}" for i in gold], "predictions": preds,
            "run": {"wall_time_s": 12.34, "llm_calls": {"score_calls": 9, "generate_calls": 0, "cache_hits": 3},
                    "versions": {"python": "3.11"}, "finished": "2026-01-01T00:00:00"}}


def test_report_tables_and_sentence():
    res = fake_results()
    df = report.results_frame(res)
    assert list(df["method"]) == ["zero_shot", "zero_shot+cm", "knn"]  # LLM method, its variant, then baselines
    assert not df.loc[df["method"] == "zero_shot+cm", "significant"].item()  # p = 0.125 with 4 discordant pairs
    sentence = report.verdict(res)
    assert sentence.startswith("On toy (n_test=8), zero_shot+cm wins with 87.5% accuracy")
    assert "37.5 points ahead of knn (50.0%" in sentence
    html_table = report.results_table(res).to_html()
    assert "87.5" in html_table and "+62.5" in html_table
    info = dict(report.run_info(res).values.tolist())
    assert info["wall time"] == "12.3 s" and info["LLM calls"].startswith("9 computed")
    gains = report.per_label_gains(res)
    assert set(gains["method"]) == {"zero_shot+cm"} and gains["net_correct"].sum() == 5
    for fig in (report.accuracy_figure(res), report.per_label_gain_figure(res)):
        assert report.figure_png_base64(fig)


def test_significant_cm_gains_are_bold_and_fractions_are_plotted():
    many = (1,) * 2 + (0,) * 18
    res = fake_results(base_right=many, cm_right=(1,) * 18 + (0,) * 2, baseline_right=many)
    assert report.is_significant(res["results"]["zero_shot+cm"])
    runs = [{"id": f"m_toy_{f}", "model": "m", "dataset": "toy", "pref_mode": "fraction", "pref": f"{f}",
             "results": fake_results(frac=f), "html": {"evaluate": f"m_toy_{f}_evaluate.html"}, "notebooks": {},
             "status": "ok"} for f in (0.01, 0.02, 0.05)]
    runs.append({"id": "m_big", "model": "m", "dataset": "big", "pref_mode": "fraction", "pref": "0.05",
                 "results": res, "html": {"evaluate": "m_big_evaluate.html"}, "notebooks": {}, "status": "ok"})
    table = report.paper_table_html(runs, link=lambda r: r["html"]["evaluate"])
    cell = f"{report.fmt_acc(0.9)} <small>{report.fmt_ci(res['results']['zero_shot+cm']['ci95'])}</small>"
    assert f"<b>{cell}</b>" in table
    assert table.count("<b>") == 1  # only that cell: the toy runs' +cm gain is not significant (p = 0.125)
    assert report.fraction_figure(runs) is not None
    assert report.fraction_figure(runs[3:]) is None  # one fraction: nothing to plot
    grid = experiments.check_grid({"datasets": ["toy", "big"], "pref_fractions": [0.01, 0.02, 0.05]})
    page = experiments.render_index(grid, runs + [{"id": "m_bad", "model": "m", "dataset": "bad", "pref": "0.05",
                                                    "status": "failed", "error": "DataError: boom", "html": {},
                                                    "notebooks": {}}])
    assert "data:image/png;base64" in page and "DataError: boom" in page and "m_toy_0.02_evaluate.html" in page


def test_index_page_escapes_what_comes_from_files():
    """Grid names, descriptions, run ids, hrefs and error messages are text, never markup, on index.html."""
    hostile = "<script>alert('x')</script>"
    grid = experiments.check_grid({"name": hostile, "description": "<img src=x onerror=alert(1)>",
                                   "datasets": [hostile], "models": [hostile], "pref_counts": [4]})
    res = fake_results(dataset=hostile)
    runs = [{"id": hostile + "ok", "model": hostile, "dataset": hostile, "pref_mode": "count", "pref": hostile,
             "results": res, "html": {"evaluate": "a'onmouseover='alert(1).html"}, "notebooks": {}, "status": "ok"},
            {"id": hostile, "model": hostile, "dataset": hostile, "pref": hostile, "status": "failed",
             "error": f"ValueError: {hostile}", "html": {}, "notebooks": {}}]
    page = experiments.render_index(grid, runs, grid_source=hostile)
    assert "<script" not in page.lower() and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; · CM results" in page  # the title, escaped
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and f"ValueError: {html.escape(hostile)}".replace(
        "&#x27;", "&#39;") in page
    assert "href='a&#39;onmouseover=&#39;alert(1).html'" in page  # the quote cannot end the attribute
    assert "<table class='paper'>" in page and "1 of 2 runs finished" in page  # report's own HTML is kept


def test_discrepancy_matrix_is_top_n_and_diagonal_first():
    from cm_core.bank import MemoryBank
    pairs = [("a", "A")] * 5 + [("b", "B")] * 4 + [("a", "B")] + [(f"r{i}", f"L{i}") for i in range(30)]
    m = report.discrepancy_matrix(pairs, top=5)
    assert m.shape == (5, 5) and list(m.columns[:2]) == ["A", "B"] and list(m.index[:2]) == ["a", "b"]
    bank = MemoryBank.from_pairs(pairs)
    assert report.discrepancy_matrix(bank, top=5).equals(m)
    assert report.figure_png_base64(report.discrepancy_heatmap(bank, top=5))


# --------------------------------------------------------------------------- the CI grid end to end (embedded LLM)

@pytest.fixture(scope="module")
def ci_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ci_grid")
    # two cells at once with one torch thread each: uses both cores, and one thread is several times faster than
    # two when other jobs share the CPU
    proc, seconds = run_cli("--grid", CI_GRID, "--out", tmp / "reports", "--cache-dir", tmp / "cache", "--threads", 1,
                            "--jobs", 2, cwd=tmp)
    print(proc.stdout, proc.stderr, f"CI grid: {seconds:.0f}s", sep="\n")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = tmp / "reports"
    cells = experiments.expand_grid(experiments.load_grid(CI_GRID))
    results = {c["id"]: json.loads((out / "runs" / c["id"] / "results.json").read_text()) for c in cells}
    return {"tmp": tmp, "out": out, "results": results, "seconds": seconds, "stdout": proc.stdout}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ci_grid_writes_every_artifact(ci_run):
    out = ci_run["out"]
    for rid, res in ci_run["results"].items():
        assert (out / "runs" / rid / "evaluate.ipynb").is_file() and (out / "runs" / rid / "bank.ipynb").is_file()
        for name in ("evaluate", "bank"):
            nb = nbformat.read(out / "runs" / rid / f"{name}.ipynb", as_version=4)
            assert not nb.metadata.papermill.get("exception")
            assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)
        assert (out / f"{rid}_evaluate.html").is_file() and (out / f"{rid}_bank.html").is_file()
        c = res["config"]
        assert c["n_test"] == 15 and c["pref_count"] == 10 and c["seed"] == 40
        assert c["model"]["kind"] == "embedded"
        assert res["results"]["zero_shot"]["kind"] == "llm"
        for b in ("label_similarity", "knn", "logreg"):
            assert res["results"][b]["kind"] == "baseline"
        assert {"zero_shot+cm", "label_similarity+cm"} <= set(res["results"])
        assert res["run"]["llm_calls"]["score_calls"] > 0  # a cold cache: the model really ran
    assert (out / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_evaluate_reports_show_the_results(ci_run):
    out = ci_run["out"]
    for rid, res in ci_run["results"].items():
        page = (out / f"{rid}_evaluate.html").read_text(encoding="utf-8")
        assert "experiments.evaluate_run(" not in page  # code cells are excluded
        assert page.count("data:image/png;base64") >= 2  # accuracy and per-label gain figures
        for name, r in res["results"].items():
            if "skipped" in r:
                continue
            assert name in page
            assert report.fmt_acc(r["accuracy"]) in page, name
            assert report.fmt_ci(r["ci95"]) in page, name
        assert esc(report.verdict(res)) in page
        run = res["run"]
        assert report.model_name(res["config"]) in page and res["config"]["dataset"] in page
        assert f"{run['wall_time_s']:.1f} s" in page
        assert esc(report._calls_text(run["llm_calls"])) in page
        for pkg, ver in run["versions"].items():
            assert f"version: {pkg}" in page and ver in page
        for must in ("n_test", "seed", "label_similarity", "knn", "logreg"):
            assert must in page


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bank_reports_show_the_bank(ci_run):
    out = ci_run["out"]
    for rid, res in ci_run["results"].items():
        page = (out / f"{rid}_bank.html").read_text(encoding="utf-8")
        bank = res["banks"]["zero_shot"]["stats"]
        assert "inspect_bank(" not in page
        assert page.count("data:image/png;base64") >= 2  # preference and test discrepancy heatmaps
        assert f"holds {bank['samples']} preference samples under {bank['entries']} distinct base responses" in page
        assert f"{100 * bank['agreement']:.1f}%" in page
        if res["request"]["code"] == experiments.code_fingerprint():  # (unless cm_core was edited meanwhile)
            assert "reused from" in page  # the bank came from the evaluation's results JSON, no second model load


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_index_has_the_paper_table_and_links(ci_run):
    out = ci_run["out"]
    index = (out / "index.html").read_text(encoding="utf-8")
    significant_cells = {f"{report.fmt_acc(r['accuracy'])} <small>{report.fmt_ci(r['ci95'])}</small>"
                         for res in ci_run["results"].values() for r in res["results"].values()
                         if "skipped" not in r and report.is_significant(r)}
    for rid, res in ci_run["results"].items():
        assert f"href='{rid}_evaluate.html'" in index and f"href='{rid}_bank.html'" in index
        assert f"href='runs/{rid}/evaluate.ipynb'" in index and f"href='runs/{rid}/results.json'" in index
        for name, r in res["results"].items():
            if "skipped" in r:
                continue
            cell = f"{report.fmt_acc(r['accuracy'])} <small>{report.fmt_ci(r['ci95'])}</small>"
            assert cell in index, (rid, name)
            if report.is_significant(r):
                assert f"<b>{cell}</b>" in index
            elif not significant_cells & {cell}:
                assert f"<b>{cell}</b>" not in index, (rid, name)
        assert esc(report.verdict(res)) in index


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_rerun_reuses_the_finished_runs(ci_run):
    """Re-running a finished grid takes seconds: up-to-date runs are not executed again; and a notebook executed
    again (say, after a report change) gets the saved results JSON back without loading a model."""
    out, tmp = ci_run["out"], ci_run["tmp"]
    if any(r["request"]["code"] != experiments.code_fingerprint() for r in ci_run["results"].values()):
        pytest.skip("cm_core was edited while the grid ran: its runs are rightly out of date")
    before = {rid: (out / "runs" / rid / "results.json").read_text() for rid in ci_run["results"]}
    proc, seconds = run_cli("--grid", CI_GRID, "--out", out, "--cache-dir", tmp / "cache", cwd=tmp)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"re-run of the CI grid: {seconds:.1f}s (first run: {ci_run['seconds']:.0f}s)")
    assert proc.stdout.count("up to date") == len(ci_run["results"])
    assert seconds < 60
    index = (out / "index.html").read_text(encoding="utf-8")
    for rid, res in ci_run["results"].items():
        assert (out / "runs" / rid / "results.json").read_text() == before[rid]
        assert f"href='{rid}_evaluate.html'" in index and esc(report.verdict(res)) in index

        nb = nbformat.read(out / "runs" / rid / "evaluate.ipynb", as_version=4)
        params = {k: v for k, v in nb.metadata.papermill["parameters"].items() if k != "repo_root"}
        t0 = time.time()
        again = experiments.evaluate_run(**params)
        assert time.time() - t0 < 5
        assert again["run"]["reused_from"] == str(out / "runs" / rid / "results.json")
        assert again["results"] == res["results"]


# --------------------------------------------------------------------------- the paper protocol in reports

def test_paper_protocol_through_the_notebook_api_and_the_grid(fake_openai, tmp_path):
    """protocol="paper" reaches the evaluation from the notebooks' API and the grid: its one shared bank is what
    inspect_bank shows, our protocol's settings are refused there, and paper cells get their own ids."""
    server = fake_openai(lambda query, listed: "'alarm'")
    params = dict(model="openai:fake", base_url=server.base_url, dataset="massive_scenario", pref_fraction=0.01,
                  n_test=6, methods=["zero_shot", "zero_shot+cm_paper"], seed=40, protocol="paper")
    out = tmp_path / "results.json"
    res = experiments.evaluate_run(cache_dir=tmp_path / "cache", results_path=out, **params)
    assert res["config"]["protocol"] == "paper" and res["config"]["pref_count"] == 115  # 1 % of large
    assert res["predictions"]["zero_shot"] == ["alarm"] * 6 and "shared" in res["banks"]
    insp = experiments.inspect_bank(cache_dir=tmp_path / "cache", results_path=out, **params)
    assert insp["source"] == "results" and insp["bank"] == res["banks"]["shared"]["bank"]
    with pytest.raises(CMError, match="decoding: our protocol's settings"):
        experiments.make_request(dataset="banking77", protocol="paper", decoding="generate")
    with pytest.raises(CMError, match="not in the paper protocol"):
        experiments.make_request(dataset="banking77", protocol="paper", methods=["knn"])
    with pytest.raises(CMError, match="n_test_other belongs to the paper protocol"):
        experiments.make_request(dataset="banking77", n_test_other=100)
    grid = experiments.check_grid({"datasets": ["banking77"], "protocol": "paper", "pref_fractions": [0.01, 0.05],
                                   "methods": ["zero_shot", "zero_shot+cm_paper"], "n_test_other": 100})
    cells = experiments.expand_grid(grid)
    assert [c["id"] for c in cells] == ["paper_embedded_banking77_0.01", "paper_embedded_banking77_0.05"]
    assert all(c["params"]["protocol"] == "paper" and c["params"]["n_test_other"] == 100 for c in cells)
    html = experiments.render_index(grid, [])
    assert "Protocol <b>paper</b>" in html


def test_index_only_renders_sections_and_markdown_tables_from_stored_runs(tmp_path, capsys):
    """``--index-only`` runs nothing: index.html is rendered from the runs on disk, with each section's table
    linking into its folder; the markdown tables read the same runs."""
    from cm_core.experiments import tables
    from cm_core.experiments.grid import main as grid_main
    many = (1,) * 2 + (0,) * 18
    out = tmp_path / "reports"
    for folder, dataset in (("", "toy"), ("sub", "big")):
        run = out / folder / "runs" / f"m_{dataset}"
        run.mkdir(parents=True)
        res = json.loads(json.dumps(fake_results(dataset=dataset, base_right=many, cm_right=(1,) * 18 + (0,) * 2,
                                                 baseline_right=many)))  # a copy: fake_results is memoized
        res["config"]["rename"] = "codes" if folder else None
        (run / "results.json").write_text(json.dumps(res))
        (run / "run.json").write_text(json.dumps({
            "id": f"m_{dataset}", "model": "m", "dataset": dataset, "pref_mode": "fraction", "pref": "5% of the data",
            "status": "ok", "error": None, "notebooks": {}, "html": {"evaluate": f"m_{dataset}_evaluate.html"},
            "results_json": f"runs/m_{dataset}/results.json"}))
    grid_file = tmp_path / "g.json"
    grid_file.write_text(json.dumps({"name": "main", "models": ["m"], "datasets": ["toy"], "sections": ["sub"]}))
    assert grid_main(["--grid", str(grid_file), "--out", str(out), "--index-only"]) == 0
    page = (out / "index.html").read_text()
    assert "Section: <a href='sub/index.html'>sub</a>" in page and "href='sub/m_big_evaluate.html'" in page
    assert "opaque codes" in page  # the section says which setting made it
    assert not (out / "runs" / "m_toy" / "evaluate.ipynb").exists()  # nothing was run
    capsys.readouterr()
    assert tables.main([str(out / "sub")]) == 0
    md = capsys.readouterr().out
    assert "| method | big |" in md and "| zero_shot+cm | **90.0 [" in md and "Δ+80.0 p" in md
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- tables reports/sub -->\nstale numbers\n<!-- /tables -->\nafter\n")
    assert tables.main(["--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "stale numbers" not in text and text.startswith("intro\n<!-- tables reports/sub -->\n#### `reports/sub` (")
    assert "| zero_shot+cm | **90.0 [" in text and text.endswith("<!-- /tables -->\nafter\n")
    assert tables.refill(text, tmp_path) == text  # refilling twice changes nothing
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"datasets": ["toy"], "sections": ["../elsewhere"]}))
    assert grid_main(["--grid", str(bad), "--out", str(out), "--index-only"]) != 0


def test_cm_verdict_says_whether_cm_beat_its_base():
    many = (1,) * 2 + (0,) * 18
    better = fake_results(base_right=many, cm_right=(1,) * 18 + (0,) * 2, baseline_right=many)
    assert report.cm_verdict(better) == ("CM against its base, 1 comparisons: Δ from +80.0 to +80.0 points; "
                                         "significantly better in 1 (zero_shot+cm +80.0 (p<0.001)).")
    worse = fake_results(base_right=(1,) * 18 + (0,) * 2, cm_right=many, baseline_right=many)
    assert "significantly worse in 1 (zero_shot+cm -80.0" in report.cm_verdict(worse)
    assert report.cm_verdict(fake_results()).endswith("no significant change.")  # p = 0.125


def test_make_portable_strips_machine_paths_and_warnings_but_keeps_errors(tmp_path):
    from cm_core.experiments.grid import make_portable
    root = tmp_path / "repo"
    nb = {"cells": [{"cell_type": "code", "source": f"cache_dir = '{root}/.cm_cache'\nrepo_root = '{root}'",
                     "outputs": [{"output_type": "stream", "name": "stderr",
                                  "text": "/usr/lib/site-packages/x.py:1: UserWarning: glyph missing"},
                                 {"output_type": "stream", "name": "stdout", "text": "acc 0.5"},
                                 {"output_type": "error", "ename": "ValueError", "evalue": "boom", "traceback": []}]}],
          "metadata": {"papermill": {"output_path": f"{root}/reports/runs/x/evaluate.ipynb"}}}
    path = tmp_path / "evaluate.ipynb"
    path.write_text(json.dumps(nb))
    make_portable(path, root)
    text = path.read_text()
    assert str(root) not in text and "site-packages" not in text
    cell = json.loads(text)["cells"][0]
    assert "cache_dir = '.cm_cache'" in cell["source"] and "repo_root = '.'" in cell["source"]
    assert [o["output_type"] for o in cell["outputs"]] == ["stream", "error"]  # stdout and the error stay
    assert json.loads(text)["metadata"]["papermill"]["output_path"] == "reports/runs/x/evaluate.ipynb"
