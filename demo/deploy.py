"""What a deployment of the demo decides: limits, the response cache, which backends a visitor may reach, the API
key's handling, and how every error reaches the page.

- **Limits** (``CM_DEMO_MAX_PREF``, ``CM_DEMO_MAX_EVAL``, 5 MB uploads, 50 labels, 1000-character queries).
- **Backends.** Local models are shared read-only (one per spec, at most ``CM_DEMO_MAX_MODELS``, behind a lock);
  an OpenAI-compatible client is built per request because it holds the key. The key is never stored in state,
  a log line or a message; the server's own OPENAI_API_KEY goes only to the server's own endpoint.
- **Outbound connections.** On every deployment a base URL typed in the page must resolve to public internet
  addresses: private, loopback, link-local (cloud metadata), reserved and other non-global addresses are refused
  (a visitor could otherwise reach, or port-scan, the server's own network), unless the owner sets
  CM_DEMO_ALLOW_PRIVATE_URLS=1 (a local vLLM / Ollama on your own machine). The name is resolved once; the
  connection is pinned to the addresses that were checked (no second lookup, so DNS rebinding cannot swap them),
  TLS still verifies the name, redirects are not followed and no proxy from the environment is used.
- **Public deployments** (SPACE_ID set, or CM_DEMO_PUBLIC=1) also refuse Hugging Face models by id (gigabytes of
  download into memory shared by everyone; allow with CM_DEMO_ALLOW_HF=1, optionally only
  CM_DEMO_HF_MODELS=id1,id2). A model that cannot be loaded is "not found", whatever the reason, so the page never
  tells whether a path exists on the server.
- **Start-up.** :func:`prepare` loads the default local model in the background when the app starts (the
  embedded model's one-time conversion takes ~30 s); a handler that needs it waits with its own progress line.
- **Errors.** :func:`guarded` turns every exception into a ``gr.Error`` with a readable message, HTML-escaped
  (gradio renders messages as HTML) and with the request's API key redacted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import html
import inspect
import ipaddress
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gradio as gr

from cm_core.backends import DEFAULT_CACHE_DIR, CachedLLM, ResponseCache, make_backend
from cm_core.errors import BackendError, CMError

log = logging.getLogger(__name__)

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


def allow_private_urls() -> bool:
    """CM_DEMO_ALLOW_PRIVATE_URLS=1: the owner lets visitors reach private and local addresses (a local server)."""
    return _flag("CM_DEMO_ALLOW_PRIVATE_URLS")


def _resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 first), once."""
    infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    addrs = list(dict.fromkeys(info[4][0] for info in infos))
    return sorted(addrs, key=lambda a: ":" in a)


def check_base_url(url: str) -> tuple[str, list[str]]:
    """A typed base URL: http(s) with a host, resolved ONCE; refused unless every address is a public (global) one
    (CM_DEMO_ALLOW_PRIVATE_URLS=1 allows private and local ones). Returns (host as sent, checked addresses): the
    connection is then pinned to those addresses (:func:`pinned_http_client`). The message is the same for a
    name that does not resolve and one that resolves to a private address (no oracle for internal names)."""
    if not re.match(r"^https?://", url, re.I):
        raise UserError("The base URL must start with http:// or https://, e.g. https://api.example.com/v1")
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise UserError("The base URL is not a valid URL, e.g. https://api.example.com/v1") from None
    if not host:
        raise UserError("The base URL has no host name, e.g. https://api.example.com/v1")
    try:
        host = host.encode("idna").decode("ascii").lower() if not _is_ip(host) else host
    except UnicodeError:
        raise UserError(f"The base URL's host name {esc(host)} is not a valid name.") from None
    refused = UserError(f"This demo connects only to servers at public internet addresses, and {esc(host)} is not "
                        "one (it resolves to a private, local or reserved address, or not at all). To use a server "
                        "on your own machine, run the demo there with CM_DEMO_ALLOW_PRIVATE_URLS=1.")
    try:
        addrs = _resolve(host, port)
    except (OSError, UnicodeError, ValueError):
        raise refused from None
    if not addrs:
        raise refused
    if not allow_private_urls():
        for a in addrs:
            if not ipaddress.ip_address(a.split("%")[0]).is_global:  # private, loopback, link-local, reserved, ...
                raise refused
    return host, addrs


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _http_modules():
    """The HTTP client package the installed openai SDK is built on (httpx, or its successor httpx2) and its
    transport core."""
    import openai._base_client as base_client
    if hasattr(base_client, "httpx2"):
        import httpcore2 as hc
        import httpx2 as hx
    else:  # pragma: no cover - older openai SDKs
        import httpcore as hc
        import httpx as hx
    return hx, hc


def pinned_http_client(host: str, addresses: list[str], timeout: float):
    """An async HTTP client for openai's ``http_client=`` that connects only to ``host`` and only at ``addresses``
    (those :func:`check_base_url` checked): no second DNS lookup, no redirects followed, no proxy or other setting
    from the environment. The URL, the Host header, TLS's SNI and its certificate check keep the host name."""
    hx, hc = _http_modules()
    allowed = host.strip("[]").lower()

    class PinnedBackend(hc.AsyncNetworkBackend):
        def __init__(self):
            self.inner = hc.AnyIOBackend()

        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            asked = host.decode("ascii") if isinstance(host, bytes) else str(host)
            if asked.strip("[]").lower() != allowed:
                raise hc.ConnectError(f"the demo connects only to {allowed}")
            last: Exception | None = None
            for ip in addresses:
                try:
                    return await self.inner.connect_tcp(ip, port, timeout=timeout, local_address=local_address,
                                                        socket_options=socket_options)
                except (hc.ConnectError, hc.ConnectTimeout, OSError) as e:
                    last = e
            if isinstance(last, (hc.ConnectError, hc.ConnectTimeout)):
                raise last
            raise hc.ConnectError(f"cannot connect to {allowed} ({type(last).__name__ if last else 'no address'})")

        async def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise hc.ConnectError("the demo does not connect to unix sockets")

        async def sleep(self, seconds):
            await self.inner.sleep(seconds)

    transport = hx.AsyncHTTPTransport(trust_env=False)
    transport._pool = hc.AsyncConnectionPool(ssl_context=hx.create_ssl_context(trust_env=False),
                                             network_backend=PinnedBackend(), max_connections=16,
                                             max_keepalive_connections=8, keepalive_expiry=5.0)
    return hx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False, timeout=timeout)


# --------------------------------------------------------------------------- the model handle

_BACKENDS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_BACKENDS_LOCK = threading.Lock()
_PREPARING: dict[tuple, concurrent.futures.Future] = {}
_FIRST_RUN: dict[tuple, bool] = {}
_PREPARE_LOCK = threading.Lock()
_PREPARER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cm-demo-prepare")
OPENAI_TIMEOUT = 60.0


def _key(spec: str, persistent_cache: bool) -> tuple:
    return (spec, str(cache_dir()), persistent_cache)


def _load_model(spec: str, persistent_cache: bool):
    """Load a local model (the embedded one is converted once, on its first use on this machine). Any failure is
    "model not found": the reason could tell a visitor whether a path exists on the server."""
    try:
        return make_backend(spec, cache_dir=cache_dir(), use_cache=persistent_cache)
    except (BackendError, OSError, ValueError) as e:
        if spec.startswith("hf:"):
            log.info("could not load %s: %s", spec, e)
            raise UserError(f"Model not found: {esc(spec[3:])}. Give a Hugging Face model id this server can load, "
                            "or use the embedded model or an OpenAI-compatible API.") from None
        raise


def _shared_model(spec: str, persistent_cache: bool):
    key = _key(spec, persistent_cache)
    with _BACKENDS_LOCK:
        llm = _BACKENDS.get(key)
        if llm is not None:
            _BACKENDS.move_to_end(key)
            return llm
    llm = _load_model(spec, persistent_cache)
    with _BACKENDS_LOCK:
        _BACKENDS[key] = llm
        while len(_BACKENDS) > MAX_LOCAL_MODELS:
            _BACKENDS.popitem(last=False)  # dropped from the cache; a request still using it keeps it alive
    return llm


def needs_conversion(spec: str) -> bool:
    """Whether loading ``spec`` first converts the model (the embedded model's one-time dequantization)."""
    if spec != "embedded":
        return False
    from cm_core.backends.hf import EMBEDDED_NAME, model_dir
    return not (model_dir() / EMBEDDED_NAME / "config.json").is_file()


def prepare(backend: str = "embedded", model: str = "") -> concurrent.futures.Future | None:
    """Start loading a local model in the background, once per model (None for the OpenAI backend, which loads
    nothing). Every request for that model then waits on the same future; a failed load is tried again."""
    spec = model_spec(backend, model)
    if spec.startswith("openai:"):
        return None
    if spec.startswith("hf:"):
        check_hf_allowed(spec[3:])
    persistent = use_response_cache()
    key = _key(spec, persistent)
    with _PREPARE_LOCK:
        fut = _PREPARING.get(key)
        loaded = key in _BACKENDS
        if fut is None or (fut.done() and (fut.exception() is not None or not loaded)):
            _FIRST_RUN[key] = needs_conversion(spec)
            fut = _PREPARER.submit(_shared_model, spec, persistent)
            _PREPARING[key] = fut
        return fut


def first_run(backend: str, model: str) -> bool:
    """Whether the model being prepared needed its one-time conversion."""
    return _FIRST_RUN.get(_key(model_spec(backend, model), use_response_cache()), False)


def prepare_at_startup() -> None:
    """Called when the app starts: prepare the default model, so the first visitor does not wait for it."""
    try:
        prepare(default_backend(), os.environ.get("CM_DEMO_MODEL", ""))
    except Exception as e:  # shown to the visitor who needs the model, with its reason
        log.warning("could not start preparing the default model: %s", e)


def wait_for_model(backend: str, model: str, progress=None) -> None:
    """Block until the local model is ready, reporting progress: "preparing the model, first run only" (the
    embedded model's one-time conversion) or "loading the model". Raises what loading raised."""
    fut = prepare(backend, model)
    if fut is None:
        return
    t0 = time.time()
    first = first_run(backend, model)
    expected = 40.0 if first else 10.0
    what = ("preparing the model, first run only (a one-time conversion, about 30 s)" if first
            else "loading the model")
    while True:
        try:
            fut.result(timeout=0.5)
            return
        except concurrent.futures.TimeoutError:
            waited = time.time() - t0
            if progress is not None:
                progress(min(0.95, waited / expected), desc=f"{what}: {waited:.0f} s")


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
        kw: dict[str, Any] = {}
        if base_url:
            host, addresses = check_base_url(base_url)
            if api_key is None:
                api_key = "EMPTY"  # never send the server's own OPENAI_API_KEY to a URL a visitor typed
            from openai import AsyncOpenAI
            kw["client"] = AsyncOpenAI(api_key=api_key, base_url=base_url, timeout=OPENAI_TIMEOUT, max_retries=0,
                                       http_client=pinned_http_client(host, addresses, OPENAI_TIMEOUT))
        llm = owned = make_backend(spec, cache_dir=cache_dir(), use_cache=persistent, base_url=base_url,
                                   api_key=api_key, max_retries=2, timeout=OPENAI_TIMEOUT, **kw)
    else:
        llm = prepare(backend, model).result()  # type: ignore[union-attr]
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
            "max_file_size": f"{MAX_FILE_MB}mb", "show_error": False,
            # the built-in example's test file is served from here, wherever the app was started from
            "allowed_paths": [str(Path(__file__).resolve().parent / "examples")]}


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
