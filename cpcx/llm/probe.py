"""What answers at an ``llm.base_url``: an Ollama server, an OpenAI-compatible server, a web page, or else.

The client libraries fail in their own ways when the server is not the kind they expect (an HTML page with
status 200 makes the openai client raise AttributeError, an OpenAI server behind ``provider: ollama`` makes
the ollama client raise a pydantic ValidationError or a JSONDecodeError). Those are not worth retrying and
their text means nothing to a user, so the providers and ``cpcx doctor`` ask this module what is really there
(two or three short GETs) and say it in one line with the fix.
"""
from __future__ import annotations

from typing import Any

from cpcx.errors import CpcxError

OLLAMA = "an Ollama server"
OPENAI = "an OpenAI-compatible server"


def _root(url: str) -> str:
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _get(client: Any, url: str) -> tuple[int, str, Any]:
    """(status, content type, decoded JSON or None) of a GET; raises httpx errors."""
    response = client.get(url)
    kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        body = response.json()
    except ValueError:
        body = None
    return response.status_code, kind, body


def identify(base_url: str, timeout: float = 2.0) -> str:
    """A few words on what answers at ``base_url`` (``OLLAMA``, ``OPENAI`` or a description)."""
    import httpx

    root = _root(base_url)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False) as client:
            status, _, body = _get(client, f"{root}/api/tags")
            if status == 200 and isinstance(body, dict) and isinstance(body.get("models"), list):
                return OLLAMA
            for url in dict.fromkeys((f"{base_url.rstrip('/')}/models", f"{root}/v1/models")):
                status, _, body = _get(client, url)
                if status == 200 and isinstance(body, dict) and isinstance(body.get("data"), list):
                    return OPENAI
            status, kind, body = _get(client, base_url)
    except httpx.HTTPError as exc:
        from cpcx.llm.providers import _connection_reason

        return f"nothing that answers ({_connection_reason(exc)})"
    if kind == "text/html":
        return f"a web page (HTML, HTTP {status})"
    return f"a server that is neither Ollama nor OpenAI-compatible (HTTP {status}, {kind or 'no content type'})"


def mismatch(provider: str, base_url: str | None, detail: str = "") -> CpcxError:
    """The one-line error for a reply that the ``provider``'s client could not read."""
    if not base_url:  # the real OpenAI API answered something odd: nothing to probe, say what the client said
        return CpcxError(f"llm: the OpenAI API sent a reply the client cannot read ({detail}); retry later")
    found = identify(base_url)
    root = _root(base_url)
    if provider == "openai" and found == OLLAMA:
        fix = f"set llm.base_url: {root}/v1 (Ollama's OpenAI-compatible API) or llm.provider: ollama"
    elif provider == "ollama" and found == OPENAI:
        fix = f"set llm.provider: openai with llm.base_url: {root}/v1"
    elif found == OPENAI and not base_url.rstrip("/").endswith("/v1"):
        fix = f"set llm.base_url: {root}/v1"
    elif found.startswith("a web page"):
        fix = ("point llm.base_url at the LLM server's API, not a web page "
               "(an OpenAI-compatible one usually ends in /v1, Ollama's is http://host:11434)")
    else:
        fix = "fix llm.base_url or llm.provider"
    expected = OLLAMA if provider == "ollama" else OPENAI
    if found == expected:
        what = f"{found} whose reply the {provider} client cannot read"
    elif found.startswith(("a server that is neither", "nothing")):
        what = found
    else:
        what = f"{found}, not {expected}"
    tail = f" ({detail})" if detail and found == expected else ""
    return CpcxError(f"llm.base_url: {base_url} is {what}{tail}; {fix}")
