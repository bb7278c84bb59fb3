"""``check_llm``: is the configured LLM reachable and does it serve the model? (``cpcx doctor``).

One request or two, each with a short timeout, and one line that says what is wrong and how to fix it:
for Ollama it tells a server that is down from a model that is not pulled (``ollama pull <model>``).
"""
from __future__ import annotations

import os
from typing import Any

from cpcx.llm.probe import OLLAMA, OPENAI, identify, mismatch
from cpcx.llm.providers import _PLACEHOLDER_KEY, _connection_reason, _short
from cpcx.redact import redact, register_env


def check_llm(llm_cfg: Any, timeout: float = 2.0) -> tuple[bool, str]:
    """``(ok, message)`` for an ``llm`` recipe section; never raises for network problems."""
    if llm_cfg.provider == "static":
        return True, f"static clusters in the recipe ({len(llm_cfg.clusters)} clusters), no server needed"
    try:
        if llm_cfg.provider == "ollama":
            return _check_ollama(llm_cfg, timeout)
        if llm_cfg.provider == "openai":
            register_env(llm_cfg.api_key_env)
            ok, line = _check_openai(llm_cfg, timeout)
            return ok, redact(line)
    except (ValueError, AttributeError, TypeError, KeyError) as exc:
        # the client could not read the reply (an HTML page, another kind of server): say what is there
        return False, str(mismatch(llm_cfg.provider, llm_cfg.base_url, f"{type(exc).__name__}"))
    return False, f"llm.provider: unknown provider '{llm_cfg.provider}'"


def _check_ollama(cfg: Any, timeout: float) -> tuple[bool, str]:
    import httpx
    import ollama

    client = ollama.Client(host=cfg.base_url, timeout=timeout)
    try:
        listed = client.list()
    except (ConnectionError, httpx.TransportError) as exc:
        reason = "timed out" if isinstance(exc, httpx.TimeoutException) else _connection_reason(exc)
        return False, (f"Ollama server at {cfg.base_url} is not reachable ({reason}); start it with "
                       "`ollama serve` or fix llm.base_url")
    except ollama.ResponseError as exc:
        if identify(cfg.base_url, timeout) != OLLAMA:
            return False, str(mismatch("ollama", cfg.base_url))
        return False, f"{cfg.base_url} answered HTTP {exc.status_code} to /api/tags; is it an Ollama server?"
    names = {m.model for m in listed.models if m.model}
    wanted = cfg.model if ":" in cfg.model else f"{cfg.model}:latest"
    if cfg.model in names or wanted in names:
        return True, f"Ollama at {cfg.base_url} serves {cfg.model}"
    try:  # the list may lack it while show() resolves it (aliases, remote models)
        client.show(cfg.model)
        return True, f"Ollama at {cfg.base_url} serves {cfg.model}"
    except ollama.ResponseError:
        pass
    except (ConnectionError, httpx.TransportError) as exc:
        return False, f"Ollama at {cfg.base_url} stopped answering ({_connection_reason(exc)})"
    return False, (f"model '{cfg.model}' is not pulled on the Ollama server at {cfg.base_url}; "
                   f"run `ollama pull {cfg.model}`")


def _check_openai(cfg: Any, timeout: float) -> tuple[bool, str]:
    import openai

    where = cfg.base_url or "the OpenAI API"
    key = os.environ.get(cfg.api_key_env, "")
    if not key and not cfg.base_url:
        return False, f"environment variable {cfg.api_key_env} is not set; export your OpenAI API key"
    client = openai.OpenAI(api_key=key or _PLACEHOLDER_KEY, base_url=cfg.base_url, timeout=timeout, max_retries=0)
    try:
        served = [m.id for m in client.models.list()]
    except openai.AuthenticationError:
        return False, f"{where} refused the key in ${cfg.api_key_env} (HTTP 401); export a valid key"
    except openai.APITimeoutError:
        return False, f"{where} did not answer within {timeout:g} s; start the server or fix llm.base_url"
    except openai.APIConnectionError as exc:
        reason = _connection_reason(exc.__cause__ or exc)
        return False, f"{where} is not reachable ({reason}); start the server or fix llm.base_url"
    except openai.NotFoundError:
        found = identify(cfg.base_url, timeout) if cfg.base_url else OPENAI
        if found == OLLAMA or found.startswith("a web page"):  # a 404 page is not a server without /models
            return False, str(mismatch("openai", cfg.base_url))
        return True, f"{where} is reachable (it does not list its models)"
    except openai.APIStatusError as exc:
        return False, f"{where} answered HTTP {exc.status_code} to /models ({_short(exc.message)})"
    if cfg.model in served:
        return True, f"{where} serves {cfg.model}"
    shown = ", ".join(served[:5]) + (", …" if len(served) > 5 else "")
    return False, f"{where} does not list model '{cfg.model}' (it serves: {shown or 'nothing'}); fix llm.model"
