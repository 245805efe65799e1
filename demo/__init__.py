"""The Gradio demo of cm-personalize (``python demo/app.py``). A package only so tests can import it."""
