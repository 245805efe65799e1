"""Consistent Marginalization demo: answer in *your* labels from a handful of your own examples.

Run locally (offline, embedded SmolLM2-135M on CPU):  ``python demo/app.py``  -> http://127.0.0.1:7860

This file is the page: its layout and the wiring of each event to a handler. Importing it builds nothing;
:func:`build_demo` builds the Blocks and ``__main__`` launches them. The handlers (which call the library and
format its answers) are in ``handlers.py``; limits, backends, the API key's handling, public-deployment guards
and error messages in ``deploy.py`` (its docstring lists the environment variables).

Environment: CM_DEMO_CACHE_DIR (response cache; else CM_CACHE_DIR, else ~/.cache/cm-personalize),
CM_DEMO_RESPONSE_CACHE=0 (keep no prompts/answers on disk), CM_DEMO_BACKEND (embedded|openai|hf), CM_DEMO_MODEL
(model name for openai/hf), OPENAI_API_KEY, OPENAI_BASE_URL, CM_DEMO_ALLOW_PRIVATE_URLS=1 (let the page reach a
local or private server), GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, SPACE_ID (set by Hugging Face Spaces; see
deploy.py for what a public deployment refuses).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default; no phoning home

HERE = Path(__file__).resolve().parent
try:  # repository layout: demo/ next to cm_core/; on a Space, cm_core/ is copied next to app.py
    import cm_core  # noqa: F401  (only: is it importable?)
except ImportError:  # pragma: no cover - depends on how the app is started
    sys.path.insert(0, str(HERE.parent))

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

if __package__:  # imported as demo.app
    from . import deploy, handlers
else:  # python demo/app.py, or a Space's app.py with handlers.py and deploy.py beside it
    import deploy  # type: ignore[no-redef]
    import handlers  # type: ignore[no-redef]

INTRO = """# Consistent Marginalization: an LLM that answers in *your* labels

Give a handful of your own examples (a text and the label **you** would give it). The model answers in **its own
words** (alarm, weather, music, …) or picks one of **your labels**; on your samples we count which of your labels
each of its answers really meant (the *memory bank*). At question time CM maps the model's answer through that bank,
or re-asks among the few labels it could mean. No training, no weights changed: the bank is a small table you can
download. *Build* tries both ways on rows it holds out of your samples and keeps the better one.

The default model is tiny and offline (SmolLM2-135M on CPU), so expect modest accuracy: the kNN and
logistic-regression rows show what a classifier trained on the same samples gets, and on the built-in example they
win. Under *Model settings* you can pick an OpenAI-compatible API or another local model for a realistic run. Every
bank and evaluation comes with the `python -m cm_core` command line that repeats it.
"""

HOW_TO = f"""**Format:** CSV/TSV with a header row (commas, tabs or semicolons), or JSONL (one JSON object per
line). One column holds the text, another your label. Up to {deploy.MAX_FILE_MB} MB, UTF-8. Example:
`utterance,my_label` / `wake me at six,wake-up buzz`."""

WORDS_HELP = """**The model's own words** (one per line): the plain names the model answers in when it answers in its
own words; CM's bank maps them onto your labels. The built-in example fills in its own; leave this empty for a generic
list (alarm, audio, calendar, cooking, …: the 18 MASSIVE scenario names)."""

FILE_TYPES = [".csv", ".tsv", ".jsonl", ".json", ".txt"]

# Tables wrap and fit their column; the heatmap keeps a readable size and scrolls sideways on a phone.
CSS = """
.cm-table th, .cm-table td, .cm-table [role=gridcell], .cm-table th span, .cm-table [role=gridcell] span {
  white-space: normal !important; overflow-wrap: normal !important; word-break: normal !important; }
.cm-table th.first-column, .cm-table th.first-column span, .cm-table [role=gridcell].first-column,
.cm-table [role=gridcell].first-column span { overflow-wrap: anywhere !important; }
#bank-plot .matplotlib { justify-content: flex-start !important; align-items: flex-start !important; overflow-x: auto; }
@media (max-width: 640px) {
  .cm-table th, .cm-table td, .cm-table [role=gridcell], .cm-table span { font-size: 11px !important; }
  .cm-table th, .cm-table td, .cm-table [role=gridcell], .cm-table .cell-wrap, .cm-table .header-content {
    padding: 1px 2px !important; }
  #bank-plot img { max-width: none !important; width: auto !important; height: auto !important; }
}
"""


def build_demo() -> gr.Blocks:
    """The page: four sections (samples, memory bank, ask, batch evaluation), each event wired to a handler."""
    h = handlers
    with gr.Blocks(title="CM: answer in your labels", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        state = gr.State(None)  # this session's samples, split and banks; never the API key
        gr.HTML(f"<style>{CSS}</style>", padding=False)
        gr.Markdown(INTRO)

        with gr.Accordion("Model settings", open=False):
            with gr.Row():
                backend = gr.Radio(list(deploy.BACKENDS), value=deploy.default_backend(), label="Backend",
                                   info="embedded: SmolLM2-135M on CPU, offline. openai: any OpenAI-compatible "
                                        "server. hf: a local transformers model id or path.")
                model = gr.Textbox(value=os.environ.get("CM_DEMO_MODEL", ""), label="Model",
                                   placeholder="gpt-4o-mini  or  HuggingFaceTB/SmolLM2-360M-Instruct",
                                   info="ignored for embedded")
            with gr.Row():
                base_url = gr.Textbox(label="Base URL (OpenAI-compatible, optional)",
                                      placeholder="https://api.example.com/v1")
                api_key = gr.Textbox(label="API key (optional: else the server's OPENAI_API_KEY)", type="password",
                                     placeholder="sk-…  used for your requests only, never stored")

        gr.Markdown("## 1 · Your preference samples")
        with gr.Row():
            with gr.Column():
                samples_file = gr.File(label="Upload samples (CSV, TSV or JSONL)", file_types=FILE_TYPES,
                                       elem_id="samples-file")
                example_btn = gr.Button("Use the built-in example", elem_id="example-btn")
            with gr.Column():
                pasted = gr.Textbox(label="…or paste rows here", lines=5, max_lines=12, elem_id="pasted",
                                    placeholder="text,label\nwake me at six,wake-up buzz\nis it raining,sky report")
                paste_btn = gr.Button("Load pasted rows", size="sm", elem_id="paste-btn")
        gr.Markdown(HOW_TO)
        with gr.Row():
            text_col = gr.Dropdown([], label="Text column", allow_custom_value=True, interactive=True,
                                   elem_id="text-col")
            label_col = gr.Dropdown([], label="Label column (your labels)", allow_custom_value=True, interactive=True,
                                    elem_id="label-col")
        data_status = gr.Markdown("No samples loaded yet.", elem_id="data-status")
        preview = gr.Dataframe(pd.DataFrame(columns=["text", "label"]), label="First rows", interactive=False,
                               max_height=260, wrap=True, elem_classes="cm-table", column_widths=["70%", "30%"])

        gr.Markdown("## 2 · Memory bank")
        with gr.Row():
            method = gr.Dropdown([(v, k) for k, v in h.METHODS.items()], value="auto", label="Base method",
                                 info="how the model answers before CM", elem_id="method")
            pref_fraction = gr.Slider(0.1, 1.0, value=0.8, step=0.05, label="Preference fraction",
                                      info="share of your rows used as preference samples; the rest is held out "
                                           "to compare the methods", elem_id="pref-fraction")
            temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature",
                                    info="sampling temperature of the model's answers on your samples (the "
                                         "paper: 0.7)", elem_id="temperature")
        with gr.Accordion("The model's own words", open=True, elem_id="words-box"):
            gr.Markdown(WORDS_HELP)
            with gr.Row():
                words = gr.Textbox(label="The model's own words (one per line; empty = a generic list)", lines=4,
                                   max_lines=12, elem_id="words")
                words_file = gr.File(label="…or upload a word list (.txt, one per line)", file_types=[".txt"],
                                     elem_id="words-file", height=110)
        with gr.Row():
            build_btn = gr.Button("Build memory bank", variant="primary", elem_id="build-btn")
            bank_upload = gr.File(label="…or upload a saved bank (this app's JSON or the paper's format)",
                                  file_types=[".json"], elem_id="bank-file", height=110)
        bank_status_md = gr.Markdown("", elem_id="bank-status")
        with gr.Row():
            bank_df = gr.Dataframe(pd.DataFrame(columns=h.BANK_COLUMNS), label="Bank: model answer → your label "
                                   "(count, p)", interactive=False, max_height=380, wrap=True,
                                   elem_id="bank-table", elem_classes="cm-table",
                                   column_widths=["33%", "35%", "16%", "16%"])
            with gr.Column():
                gr.Markdown("**Heatmap:** the model's answers (rows) against your labels (columns); outlined where "
                            "the two agree.")
                bank_plot = gr.Plot(show_label=False, elem_id="bank-plot", format="png")
        with gr.Row():
            bank_dl = gr.DownloadButton("Download bank (JSON)", elem_id="bank-download", interactive=False)
            held_dl = gr.DownloadButton("Download held-out rows (CSV)", elem_id="held-download", interactive=False)

        gr.Markdown("## 3 · Ask")
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="e.g. set a timer for the potatoes", scale=4,
                               elem_id="query", max_length=deploy.MAX_QUERY_CHARS)
            ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask-btn")
        gr.Examples(h.EXAMPLE_QUERIES, inputs=[query], label="Example queries (for the built-in example)")
        with gr.Row():
            base_ans = gr.Textbox(label="Model alone (its answer)", interactive=False, elem_id="baseline-answer")
            cm_ans = gr.Textbox(label="CM answer (through your bank)", interactive=False, elem_id="cm-answer")
        why = gr.Textbox(label="Which bank entry fired, and what CM answered", interactive=False, lines=2,
                         elem_id="why")
        cand_df = gr.Dataframe(pd.DataFrame(columns=h.CAND_COLUMNS), label="Bank candidates for the model's answer "
                               "(count in the bank, p(your label | its answer), the re-ask's score)",
                               interactive=False, wrap=True, elem_id="cand-table", elem_classes="cm-table",
                               column_widths=["34%", "16%", "26%", "24%"])
        with gr.Row():
            all_df = gr.Dataframe(pd.DataFrame(columns=h.ALL_COLUMNS), interactive=False, wrap=True,
                                  label="All methods on this query (kNN / logistic regression: classifiers trained "
                                        "on the same samples, for an honest comparison)",
                                  elem_id="all-table", elem_classes="cm-table",
                                  column_widths=["46%", "30%", "24%"])
            score_df = gr.Dataframe(pd.DataFrame(columns=h.SCORE_COLUMNS), label="The model's scores for its "
                                    "answers to this query", interactive=False, max_height=300, wrap=True,
                                    elem_id="score-table", elem_classes="cm-table", column_widths=["60%", "40%"])

        gr.Markdown("## 4 · Batch evaluation")
        with gr.Row():
            test_file = gr.File(label="Labelled test file (same columns as your samples); empty = held-out rows",
                                file_types=FILE_TYPES, elem_id="test-file")
            with gr.Column():
                example_test_btn = gr.Button("Use the built-in example's test file", size="sm")
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
        eval_md = gr.Markdown("", elem_id="eval-status")
        eval_df = gr.Dataframe(pd.DataFrame(columns=h.EVAL_COLUMNS),
                               label="Accuracy (acc., %) with 95% bootstrap CIs, macro-F1 (%); p: McNemar's test of "
                                     "each CM against its base method",
                               interactive=False, wrap=True, elem_id="eval-table", elem_classes="cm-table",
                               column_widths=["24%", "11%", "11%", "11%", "11%", "22%", "10%"])
        eval_dl = gr.DownloadButton("Download per-row CSV", elem_id="eval-download", interactive=False)

        gr.Markdown("<small>Consistent Marginalization (CM): a training-free way to personalize an LLM's labels. "
                    "Your files and bank stay in your browser session; the API key is used for your requests only."
                    "</small>")

        # ---------------------------------------------------------------- events
        model_in = [backend, model, base_url, api_key]
        load_out = [state, text_col, label_col, data_status, preview]
        answers_out = [base_ans, cm_ans, why, cand_df, score_df, all_df, eval_df, eval_md, eval_dl]
        results_out = [bank_df, bank_plot, bank_dl, held_dl, bank_status_md, *answers_out]
        # new samples: every result of the old ones leaves the page; a refused file leaves its box
        up = samples_file.upload(h.load_samples, [samples_file, pasted, state], load_out, api_name="load_samples")
        up.success(h.clear_for_upload, [words], [*results_out, test_file, words], api_name=False)
        up.failure(h.samples_upload_failed, [samples_file, state], [samples_file, data_status], api_name=False)
        pa = paste_btn.click(h.load_pasted, [pasted, state], load_out, api_name="load_pasted")
        pa.success(h.clear_after_paste, [words], [*results_out, test_file, words, samples_file], api_name=False)
        pa.failure(h.paste_failed, [pasted, state], [data_status], api_name=False)
        ex = example_btn.click(h.load_example, [state], [*load_out, test_file, words], api_name="use_example")
        ex.success(h.clear_results, None, [*results_out, samples_file], api_name=False)
        for dd in (text_col, label_col):
            dd.input(h.preview_columns, [state, text_col, label_col], [data_status, preview], api_name=False,
                     concurrency_limit=None)
        words_file.upload(h.load_words, [words_file], [words], api_name=False)
        bank_out = [state, bank_df, bank_plot, bank_dl, held_dl, bank_status_md]
        bb = build_btn.click(h.build_bank, [text_col, label_col, *model_in, method, pref_fraction, temperature, words,
                                            state], bank_out, api_name="build_bank")
        bb.success(h.clear_answers, None, answers_out, api_name=False).then(
            h.downloads_ready, [bank_dl, held_dl], [bank_dl, held_dl], api_name=False)
        bu = bank_upload.upload(h.upload_bank, [bank_upload, text_col, label_col, pref_fraction, words, state],
                                bank_out, api_name="upload_bank")
        bu.success(h.clear_answers, None, answers_out, api_name=False).then(
            h.downloads_ready, [bank_dl, held_dl], [bank_dl, held_dl], api_name=False)
        bu.failure(h.bank_upload_failed, [bank_upload, state], [bank_upload, bank_status_md], api_name=False)
        ask_out = [base_ans, cm_ans, why, cand_df, score_df, all_df]
        ask_btn.click(h.ask, [query, *model_in, state], ask_out, api_name="ask")
        query.submit(h.ask, [query, *model_in, state], ask_out, api_name=False)
        example_test_btn.click(h.use_example_test, None, [test_file], api_name="example_test")
        eval_btn.click(h.evaluate_batch, [test_file, text_col, label_col, *model_in, state],
                       [eval_df, eval_md, eval_dl], api_name="evaluate").success(
            h.downloads_ready, [eval_dl], [eval_dl], api_name=False)
    demo.queue(**deploy.queue_kwargs())
    return demo


def main() -> None:
    deploy.set_torch_threads()
    deploy.prepare_at_startup()  # the default model loads (first run: converts) while the page starts
    build_demo().launch(**deploy.launch_kwargs())


if __name__ == "__main__":
    main()
