"""What a deployment of the demo decides: limits, the response cache, which backends a visitor may reach, the API
key's handling, and how every error reaches the page.

- **Limits** (``CM_DEMO_MAX_PREF``, ``CM_DEMO_MAX_EVAL``, 5 MB uploads, 50 labels, 1000-character queries).
- **Backends.** Local models are shared read-only (one per spec, at most ``CM_DEMO_MAX_MODELS``, behind a lock);
  an OpenAI-compatible client is built per request because it holds the key. The key is never stored in state,
  a log line or a message; the server's own OPENAI_API_KEY goes only to the server's own endpoint.
- **Public deployments** (SPACE_ID set, or CM_DEMO_PUBLIC=1) refuse what a visitor could abuse: Hugging Face
  models by id (gigabytes of download into memory shared by everyone; allow with CM_DEMO_ALLOW_HF=1, optionally
  only CM_DEMO_HF_MODELS=id1,id2) and base URLs that resolve to private, loopback or link-local addresses (the
  server's own network; allow with CM_DEMO_ALLOW_PRIVATE_URLS=1).
- **Errors.** :func:`guarded` turns every exception into a ``gr.Error`` with a readable message, HTML-escaped
  (gradio renders messages as HTML) and with the request's API key redacted.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import html
import inspect
import os
import re
import threading
from pathlib import Path
from typing import Any

import gradio as gr

from cm_core.backends import DEFAULT_CACHE_DIR, CachedLLM, ResponseCache, make_backend
from cm_core.errors import CMError

try:  # ZeroGPU on Hugging Face Spaces; the app never needs it
    import spaces  # type: ignore

    gpu = spaces.GPU(duration=120)
except Exception:  # ImportError, or not on a GPU Space
    def gpu(fn):
        return fn

# --------------------------------------------------------------------------- limits

MAX_FILE_MB = 5
MAX_FILE_BYTES = MAX_FILE_MB * 1024 * 1024
MAX_PREF = int(os.environ.get("CM_DEMO_MAX_PREF", "300"))  # preference samples per bank
MAX_EVAL = int(os.environ.get("CM_DEMO_MAX_EVAL", "300"))  # rows per batch evaluation
MAX_LABELS = 50
MAX_QUERY_CHARS = 1000
MAX_LOCAL_MODELS = int(os.environ.get("CM_DEMO_MAX_MODELS", "2"))
BACKENDS = ("embedded", "openai", "hf")


def cache_dir() -> Path:
    """Response cache for this app: CM_DEMO_CACHE_DIR, else CM_CACHE_DIR, else the library's default."""
    env = os.environ.get("CM_DEMO_CACHE_DIR") or os.environ.get("CM_CACHE_DIR")
    return Path(env) if env else Path(DEFAULT_CACHE_DIR)


def use_response_cache() -> bool:
    """CM_DEMO_RESPONSE_CACHE=0 keeps no prompts or answers on disk (slower: nothing is reused)."""
    return os.environ.get("CM_DEMO_RESPONSE_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def default_backend() -> str:
    backend = os.environ.get("CM_DEMO_BACKEND", "embedded")
    return backend if backend in BACKENDS else "embedded"


# --------------------------------------------------------------------------- errors shown to the user

class UserError(Exception):
    """A problem the user can fix; its message is shown as it is (already escaped where it quotes user text)."""


def esc(value: Any) -> str:
    """User-provided text inside a message: gradio renders messages and Markdown as HTML."""
    return html.escape(str(value), quote=False)


def md(value: Any) -> str:
    """User text inside Markdown: HTML-escaped and Markdown-inert."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", esc(value))


def redact(message: str, secret: str | None) -> str:
    if secret:
        message = message.replace(secret, "[redacted]")
    return message


def guarded(fn):
    """Turn every exception into a clear gr.Error; nothing reaches the user as a traceback or a crash, and the
    request's ``api_key`` argument never appears in a message."""

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            secret = sig.bind_partial(*args, **kwargs).arguments.get("api_key")
        except TypeError:
            secret = None
        secret = secret if isinstance(secret, str) and len(secret) >= 4 else None
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except UserError as e:
            raise gr.Error(redact(str(e), secret), title="Please check your input", print_exception=False) from None
        except CMError as e:
            raise gr.Error(esc(redact(str(e), secret)), title=type(e).__name__, print_exception=False) from None
        except MemoryError:
            raise gr.Error("Out of memory: try fewer samples or a smaller model.", print_exception=False) from None
        except Exception as e:  # a bug or an unexpected library error: say what, keep the app running
            msg = esc(redact(f"{type(e).__name__}: {e}", secret))[:500]
            raise gr.Error(f"Unexpected error ({msg}). The app is still running; please try again.",
                           print_exception=False) from None

    return wrapper


# --------------------------------------------------------------------------- which models a visitor may use

def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def is_public() -> bool:
    """Served to strangers: a Hugging Face Space (SPACE_ID) or CM_DEMO_PUBLIC=1."""
    return bool(os.environ.get("SPACE_ID")) or _flag("CM_DEMO_PUBLIC")


def model_spec(backend: str, model: str) -> str:
    """The library's backend spec (``embedded``, ``openai:NAME``, ``hf:ID``) for the page's two fields."""
    backend = (backend or "embedded").strip().lower()
    model = (model or "").strip()
    if backend == "embedded":
        return "embedded"
    if backend not in ("openai", "hf"):
        raise UserError(f"Unknown backend {esc(backend)}; choose embedded, openai or hf.")
    if not model:
        raise UserError(f"The {backend} backend needs a model name, e.g. "
                        + ("gpt-4o-mini" if backend == "openai" else "HuggingFaceTB/SmolLM2-360M-Instruct") + ".")
    if len(model) > 200 or any(c.isspace() for c in model):
        raise UserError("The model name looks wrong (no spaces, at most 200 characters).")
    return f"{backend}:{model}"


def check_hf_allowed(model: str) -> None:
    if not is_public():
        return
    if not _flag("CM_DEMO_ALLOW_HF"):
        raise UserError("This public demo does not load Hugging Face models by name (each one is gigabytes of "
                        "download and memory shared by every visitor). Use the embedded model or an "
                        "OpenAI-compatible API, or run the demo on your own machine: python demo/app.py")
    allowed = [m.strip() for m in os.environ.get("CM_DEMO_HF_MODELS", "").split(",") if m.strip()]
    if allowed and model not in allowed:
        raise UserError(f"This demo serves only these Hugging Face models: {esc(', '.join(allowed))}.")


def check_base_url(url: str) -> None:
    """A typed base URL must be http(s); on a public deployment it must not reach the server's own network."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit
    if not re.match(r"^https?://", url):
        raise UserError("The base URL must start with http:// or https://, e.g. http://127.0.0.1:8000/v1")
    parts = urlsplit(url)
    host = parts.hostname
    if not host:
        raise UserError("The base URL has no host name, e.g. https://api.example.com/v1")
    if not is_public() or _flag("CM_DEMO_ALLOW_PRIVATE_URLS"):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addrs = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError):
        raise UserError(f"Cannot resolve the base URL's host {esc(host)}.") from None
    for a in addrs:
        ip = ipaddress.ip_address(a.split("%")[0])
        if not ip.is_global:  # private, loopback, link-local (cloud metadata), reserved, ...
            raise UserError(f"This public demo does not connect to {esc(host)}: it resolves to a private or "
                            "local address. Run the demo on your own machine to use a local server.")


# --------------------------------------------------------------------------- the model handle

_BACKENDS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_BACKENDS_LOCK = threading.Lock()


def _shared_model(spec: str, persistent_cache: bool):
    key = (spec, str(cache_dir()), persistent_cache)
    with _BACKENDS_LOCK:  # first user waits while the model loads; later ones get the same handle
        llm = _BACKENDS.get(key)
        if llm is None:
            llm = make_backend(spec, cache_dir=cache_dir(), use_cache=persistent_cache)
            _BACKENDS[key] = llm
            while len(_BACKENDS) > MAX_LOCAL_MODELS:
                _BACKENDS.popitem(last=False)  # dropped from the cache; a request still using it keeps it alive
        else:
            _BACKENDS.move_to_end(key)
        return llm


@contextlib.contextmanager
def backend_for(backend: str, model: str, base_url: str | None, api_key: str | None):
    """Yield an LLM. Local models are shared (one per spec, read-only); an OpenAI client lives for one request,
    since it holds the key. Without the persistent response cache, a request-scoped in-memory one is used."""
    spec = model_spec(backend, model)
    persistent = use_response_cache()
    owned = None
    if spec.startswith("openai:"):
        base_url = (base_url or "").strip() or None
        api_key = (api_key or "").strip() or None
        if base_url:
            check_base_url(base_url)
            if api_key is None:
                api_key = "EMPTY"  # never send the server's own OPENAI_API_KEY to a URL a visitor typed
        llm = owned = make_backend(spec, cache_dir=cache_dir(), use_cache=persistent, base_url=base_url,
                                   api_key=api_key, max_retries=2, timeout=60.0)
    else:
        if spec.startswith("hf:"):
            check_hf_allowed(spec[3:])
        llm = _shared_model(spec, persistent)
    if not persistent:
        llm = CachedLLM(llm, ResponseCache(":memory:"))
    try:
        yield llm
    finally:
        if not persistent:
            llm.cache.close()
        if owned is not None:
            owned.close()


# --------------------------------------------------------------------------- serving

def launch_kwargs() -> dict:
    on_space = bool(os.environ.get("SPACE_ID"))
    return {"server_name": os.environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if on_space else "127.0.0.1"),
            "server_port": int(os.environ.get("GRADIO_SERVER_PORT") or 7860),
            "max_file_size": f"{MAX_FILE_MB}mb", "show_error": False}


def queue_kwargs() -> dict:
    """Several sessions at once: the model itself serializes forward passes (per chunk), so a slow bank build
    does not hold back another user's single query for long."""
    return {"default_concurrency_limit": int(os.environ.get("CM_DEMO_CONCURRENCY", "4")), "max_size": 64}


def set_torch_threads(n: int | str | None = None) -> int | None:
    """CM_DEMO_TORCH_THREADS: on a CPU shared with other busy processes, 1 thread is several times faster than
    torch's default (its threads spin-wait for each other). Returns the previous count, or None if unchanged."""
    n = n if n is not None else os.environ.get("CM_DEMO_TORCH_THREADS")
    if not n:
        return None
    import torch
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    return old
