"""Consistent Marginalization demo: answer in *your* labels from a handful of your own examples.

Run locally (offline, embedded SmolLM2-135M on CPU):  ``python demo/app.py``  -> http://127.0.0.1:7860

This file is the page: its layout and the wiring of each event to a handler. Importing it builds nothing;
:func:`build_demo` builds the Blocks and ``__main__`` launches them. The handlers (which call the library and
format its answers) are in ``handlers.py``; limits, backends, the API key's handling, public-deployment guards
and error messages in ``deploy.py`` (its docstring lists the environment variables).

Environment: CM_DEMO_CACHE_DIR (response cache; else CM_CACHE_DIR, else ~/.cache/cm-personalize),
CM_DEMO_RESPONSE_CACHE=0 (keep no prompts/answers on disk), CM_DEMO_BACKEND (embedded|openai|hf), CM_DEMO_MODEL
(model name for openai/hf), OPENAI_API_KEY, OPENAI_BASE_URL, GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, SPACE_ID
(set by Hugging Face Spaces; see deploy.py for what a public deployment refuses).
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

Give a handful of your own examples (a text and the label **you** would give it). The model is asked to choose among
**your labels**; on your samples we count which of your labels each of its answers really meant (the *memory bank*).
At question time CM maps the model's answer through that bank, or re-asks among the few labels it could mean.
No training, no weights changed: the bank is a small table you can download.

The default model is tiny and offline (SmolLM2-135M on CPU), so expect modest accuracy: the kNN and logistic-regression
rows show what a classifier trained on the same samples gets. Under *Model settings* you can pick an
OpenAI-compatible API or another local model for a realistic run. Every bank and evaluation comes with the
`python -m cm_core` command line that repeats it.
"""

HOW_TO = f"""**Format:** CSV/TSV with a header row, or JSONL (one JSON object per line). One column holds the text,
another your label. Up to {deploy.MAX_FILE_MB} MB, UTF-8. Example: `utterance,my_label` /
`wake me at six,wake-up buzz`."""

FILE_TYPES = [".csv", ".tsv", ".jsonl", ".json", ".txt"]


def build_demo() -> gr.Blocks:
    """The page: four sections (samples, memory bank, ask, batch evaluation), each event wired to a handler."""
    h = handlers
    with gr.Blocks(title="CM: answer in your labels", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        state = gr.State(None)  # this session's samples, split and bank; never the API key
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
                                      placeholder="http://127.0.0.1:8000/v1")
                api_key = gr.Textbox(label="API key (optional: else the server's OPENAI_API_KEY)", type="password",
                                     placeholder="sk-…  used for your requests only, never stored")

        gr.Markdown("## 1 · Your preference samples")
        with gr.Row():
            with gr.Column():
                samples_file = gr.File(label="Upload samples (CSV, TSV or JSONL)", file_types=FILE_TYPES,
                                       elem_id="samples-file")
                example_btn = gr.Button("Use the built-in example", elem_id="example-btn")
            with gr.Column():
                pasted = gr.Textbox(label="…or paste rows here", lines=5, max_lines=12,
                                    placeholder="text,label\nwake me at six,wake-up buzz\nis it raining,sky report")
                paste_btn = gr.Button("Load pasted rows", size="sm")
        gr.Markdown(HOW_TO)
        with gr.Row():
            text_col = gr.Dropdown([], label="Text column", allow_custom_value=True, interactive=True,
                                   elem_id="text-col")
            label_col = gr.Dropdown([], label="Label column (your labels)", allow_custom_value=True, interactive=True,
                                    elem_id="label-col")
        data_status = gr.Markdown("No samples loaded yet.", elem_id="data-status")
        preview = gr.Dataframe(pd.DataFrame(columns=["text", "label"]), label="First rows", interactive=False,
                               max_height=260, wrap=True)

        gr.Markdown("## 2 · Memory bank")
        with gr.Row():
            method = gr.Dropdown([(v, k) for k, v in h.METHODS.items()], value="zero_shot", label="Base method",
                                 info="how the model answers before CM", elem_id="method")
            pref_fraction = gr.Slider(0.1, 1.0, value=0.8, step=0.05, label="Preference fraction",
                                      info="share of your rows used as preference samples; the rest is held out "
                                           "for the batch evaluation", elem_id="pref-fraction")
            temperature = gr.Slider(0.0, 1.5, value=0.7, step=0.05, label="Temperature",
                                    info="sampling temperature of the model's answers on your samples (the "
                                         "paper: 0.7)", elem_id="temperature")
        with gr.Row():
            build_btn = gr.Button("Build memory bank", variant="primary", elem_id="build-btn")
            bank_upload = gr.File(label="…or upload a saved bank (this app's JSON or the paper's format)",
                                  file_types=[".json"], elem_id="bank-file", height=110)
        bank_status_md = gr.Markdown("", elem_id="bank-status")
        with gr.Row():
            bank_df = gr.Dataframe(pd.DataFrame(columns=h.BANK_COLUMNS), label="Bank: model answer → your label "
                                   "(count, p)", interactive=False, max_height=380)
            bank_plot = gr.Plot(label="Discrepancy heatmap")
        with gr.Row():
            bank_dl = gr.DownloadButton("Download bank (JSON)", elem_id="bank-download")
            held_dl = gr.DownloadButton("Download held-out rows (CSV)", elem_id="held-download")

        gr.Markdown("## 3 · Ask")
        with gr.Row():
            query = gr.Textbox(label="Query", placeholder="e.g. set a timer for the potatoes", scale=4,
                               elem_id="query", max_length=deploy.MAX_QUERY_CHARS)
            ask_btn = gr.Button("Ask", variant="primary", scale=1, elem_id="ask-btn")
        gr.Examples(h.EXAMPLE_QUERIES, inputs=[query], label="Example queries (for the built-in example)")
        with gr.Row():
            base_ans = gr.Textbox(label="Baseline answer (model alone)", interactive=False, elem_id="baseline-answer")
            cm_ans = gr.Textbox(label="CM answer (through your bank)", interactive=False, elem_id="cm-answer")
        why = gr.Textbox(label="Which bank entry fired", interactive=False, lines=2, elem_id="why")
        with gr.Row():
            cand_df = gr.Dataframe(pd.DataFrame(columns=h.CAND_COLUMNS), label="Bank candidates for the model's "
                                   "answer", interactive=False)
            score_df = gr.Dataframe(pd.DataFrame(columns=h.SCORE_COLUMNS), label="Model's p(label | query) over "
                                    "your labels", interactive=False, max_height=300)
        all_df = gr.Dataframe(pd.DataFrame(columns=h.ALL_COLUMNS), interactive=False,
                              label="All methods on this query (kNN / logistic regression: classifiers trained on "
                                    "the same samples, for an honest comparison)")

        gr.Markdown("## 4 · Batch evaluation")
        with gr.Row():
            test_file = gr.File(label="Labelled test file (same columns as your samples); empty = held-out rows",
                                file_types=FILE_TYPES, elem_id="test-file")
            with gr.Column():
                example_test_btn = gr.Button("Use the built-in example's test file", size="sm")
                eval_btn = gr.Button("Evaluate", variant="primary", elem_id="eval-btn")
        eval_md = gr.Markdown("", elem_id="eval-status")
        eval_df = gr.Dataframe(pd.DataFrame(columns=h.EVAL_COLUMNS), label="Accuracy with 95% bootstrap CIs",
                               interactive=False)
        eval_dl = gr.DownloadButton("Download per-row CSV", elem_id="eval-download")

        gr.Markdown("<small>Consistent Marginalization (CM): a training-free way to personalize an LLM's labels. "
                    "Your files and bank stay in your browser session; the API key is used for your requests only."
                    "</small>")

        # ---------------------------------------------------------------- events
        model_in = [backend, model, base_url, api_key]
        load_out = [state, text_col, label_col, data_status, preview]
        samples_file.upload(h.load_samples, [samples_file, pasted, state], load_out, api_name="load_samples")
        paste_btn.click(h.load_samples, [samples_file, pasted, state], load_out, api_name=False)
        example_btn.click(h.load_example, [state], load_out + [test_file], api_name="use_example")
        for dd in (text_col, label_col):
            dd.input(h.preview_columns, [state, text_col, label_col], [data_status, preview], api_name=False,
                     concurrency_limit=None)
        bank_out = [state, bank_df, bank_plot, bank_dl, held_dl, bank_status_md]
        build_btn.click(h.build_bank, [text_col, label_col, *model_in, method, pref_fraction, temperature, state],
                        bank_out, api_name="build_bank")
        bank_upload.upload(h.upload_bank, [bank_upload, text_col, label_col, state], bank_out, api_name="upload_bank")
        ask_out = [base_ans, cm_ans, why, cand_df, score_df, all_df]
        ask_btn.click(h.ask, [query, *model_in, state], ask_out, api_name="ask")
        query.submit(h.ask, [query, *model_in, state], ask_out, api_name=False)
        example_test_btn.click(h.use_example_test, None, [test_file], api_name="example_test")
        eval_btn.click(h.evaluate_batch, [test_file, text_col, label_col, *model_in, state],
                       [eval_df, eval_md, eval_dl], api_name="evaluate")
    demo.queue(**deploy.queue_kwargs())
    return demo


def main() -> None:
    deploy.set_torch_threads()
    build_demo().launch(**deploy.launch_kwargs())


if __name__ == "__main__":
    main()
