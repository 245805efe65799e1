"""Helpers for the demo's tests: serve the app in-process on a free loopback port, with its own response cache."""
from __future__ import annotations

import contextlib
import os
import socket
import time
import urllib.request
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
EXAMPLE_SAMPLES = HERE / "examples" / "my_labels_samples.csv"
EXAMPLE_TEST = HERE / "examples" / "my_labels_test.csv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(cache_dir: str | os.PathLike) -> Iterator[str]:
    """Launch a fresh app on 127.0.0.1 (response cache in ``cache_dir``); yield its URL; close it afterwards."""
    old = os.environ.get("CM_DEMO_CACHE_DIR")
    os.environ["CM_DEMO_CACHE_DIR"] = str(cache_dir)
    from demo import app, deploy

    # One torch thread unless told otherwise: test machines are often shared, where 2 threads crawl.
    old_threads = deploy.set_torch_threads(os.environ.get("CM_DEMO_TORCH_THREADS") or 1)
    deploy.prepare_at_startup()  # as app.main does: the default model loads while the server starts
    blocks = app.build_demo()
    port = free_port()
    kw = {**deploy.launch_kwargs(), "server_name": "127.0.0.1", "server_port": port}
    blocks.launch(prevent_thread_lock=True, quiet=True, **kw)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 30
        while True:  # launch returns once the server is up; make sure it answers
            try:
                urllib.request.urlopen(url + "config", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        blocks.close()
        if old_threads is not None:
            deploy.set_torch_threads(old_threads)
        if old is None:
            os.environ.pop("CM_DEMO_CACHE_DIR", None)
        else:
            os.environ["CM_DEMO_CACHE_DIR"] = old
