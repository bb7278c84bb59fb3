"""Chat providers behind one small interface, all through langchain chat models (temperature and seed fixed).

* ``openai``: ``ChatOpenAI`` for OpenAI or any OpenAI-compatible server (vLLM, llama.cpp, LM Studio).
* ``ollama``: ``ChatOllama`` for a local Ollama server, with the ``ollama`` client for diagnostics.

``ChatProvider.chat(messages, schema)`` returns the raw text of one answer. Transport problems (connection
refused, timeouts, HTTP 5xx/429) are retried here with exponential back-off (``llm.max_retries``); the
client libraries' own retries are switched off so that there is one retry policy and one clear failure line.
Nothing here stores or prints the API key: it is read from the environment when a model is built.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from cpcx.errors import CpcxError
from cpcx.llm.probe import OLLAMA, identify, mismatch
from cpcx.redact import register_env

#: First back-off delay in seconds (doubled after each failed try, capped at 8 s). Tests make it tiny.
BACKOFF_BASE_S = 0.5
_PLACEHOLDER_KEY = "not-needed"  # OpenAI-compatible local servers want *a* key; it is never a secret


@dataclass
class Reply:
    text: str
    finish_reason: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # model name etc. as the server reports them


class TransientError(Exception):
    """A failure worth retrying (the server may answer next time)."""


class ChatProvider:
    """One LLM endpoint. Subclasses build the langchain model and classify the client's exceptions."""

    provider = "?"

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._models: dict[int, Any] = {}  # one langchain model per sampling seed, built on first use
        self.calls = 0  # HTTP requests actually sent (tests and the summary line count them)

    # identity of the model's answers: part of every cache key (never the key, the URL or the timeout)
    def identity(self) -> dict[str, Any]:
        return {"provider": self.provider, "model": self.cfg.model,
                "temperature": self.cfg.temperature, "seed": self.cfg.seed, "constraint": self.constraint}

    @property
    def constraint(self) -> str | None:
        """How the answer schema is enforced by the server (None: it is only described in the prompt)."""
        if not self.cfg.json_schema:
            return None
        return getattr(self.cfg, "schema_style", "format")

    @property
    def where(self) -> str:
        return self.cfg.base_url or "the OpenAI API"

    def chat(self, messages: list[dict[str, str]], schema: dict | None, seed: int | None = None) -> Reply:
        """One answer, with retries on transport errors; a permanent problem is a one-line ``CpcxError``.

        ``seed`` (default ``llm.seed``) is the sampling seed of this request: the R generate queries of
        Algorithm 1 send different seeds, or a server that honours the seed would give R copies of one answer.
        """
        model = self._model_for(self.cfg.seed if seed is None else seed)
        tries = self.cfg.max_retries + 1
        for attempt in range(tries):
            try:
                self.calls += 1
                return self._invoke(model, messages, schema)
            except TransientError as exc:
                if attempt + 1 >= tries:
                    raise CpcxError(self._unreachable(str(exc), tries)) from None
                time.sleep(min(BACKOFF_BASE_S * 2**attempt, 8.0))
        raise AssertionError("unreachable")

    def _unreachable(self, reason: str, tries: int) -> str:
        return (f"llm.base_url: no answer from the {self.provider} server at {self.where} ({reason}) after {tries} "
                f"{'try' if tries == 1 else 'tries'}; start the server or fix llm.base_url "
                "(llm.timeout_s and llm.max_retries set the patience)")

    def _model_for(self, seed: int) -> Any:
        if seed not in self._models:
            self._models[seed] = self._build(seed)
        return self._models[seed]

    def _build(self, seed: int) -> Any:  # pragma: no cover
        raise NotImplementedError

    def _invoke(self, model: Any, messages: list[dict[str, str]], schema: dict | None) -> Reply:  # pragma: no cover
        raise NotImplementedError


# ------------------------------------------------------------------------------------------- openai
class OpenAIProvider(ChatProvider):
    provider = "openai"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        register_env(cfg.api_key_env)  # a server or model may echo the key back: it is redacted wherever it shows

    def api_key(self) -> str:
        key = os.environ.get(self.cfg.api_key_env, "")
        if key:
            return key
        if self.cfg.base_url:
            return _PLACEHOLDER_KEY
        raise CpcxError(f"llm.api_key_env: environment variable {self.cfg.api_key_env} is not set; export it "
                        "(the key is read from the environment only, never from the recipe)")

    def _build(self, seed: int) -> Any:
        from langchain_openai import ChatOpenAI
        from pydantic import SecretStr

        extra: dict[str, Any] = {}
        if self.cfg.base_url:
            # ChatOpenAI sends only max_completion_tokens, which llama.cpp's server (and older vLLM) ignore:
            # the legacy max_tokens goes along so that the cap holds there too. OpenAI itself gets the new
            # name only, because its reasoning models reject max_tokens.
            extra["max_tokens"] = self.cfg.max_tokens
        return ChatOpenAI(
            model=self.cfg.model, temperature=self.cfg.temperature, seed=seed,
            max_tokens=self.cfg.max_tokens, timeout=self.cfg.timeout_s, max_retries=0,
            base_url=self.cfg.base_url, api_key=SecretStr(self.api_key()), extra_body=extra or None,
        )

    def _invoke(self, model: Any, messages: list[dict[str, str]], schema: dict | None) -> Reply:
        import openai

        kwargs: dict[str, Any] = {}
        if schema is not None and self.cfg.schema_style == "json_object":
            kwargs["response_format"] = {"type": "json_object", "schema": schema}  # llama-cpp-python's form
        elif schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema", "json_schema": {"name": "clusters", "schema": schema, "strict": True},
            }
        try:
            message = model.invoke(messages, **kwargs)
        except openai.LengthFinishReasonError as exc:  # structured output cut at max_tokens: still an answer
            choice = exc.completion.choices[0]
            return Reply(choice.message.content or "", "length", {"model_name": exc.completion.model})
        except (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError) as exc:
            raise TransientError(_describe_openai(exc)) from None
        except openai.AuthenticationError:
            raise CpcxError(f"llm.api_key_env: {self.where} refused the key in ${self.cfg.api_key_env} (HTTP 401); "
                            "export a valid key") from None
        except openai.NotFoundError as exc:
            raise CpcxError(f"llm.model: {self.where} does not serve model '{self.cfg.model}' (HTTP 404: "
                            f"{_short(exc.message)}); fix llm.model or llm.base_url") from None
        except openai.APIResponseValidationError as exc:  # a 2xx reply that is no chat completion
            raise mismatch(self.provider, self.cfg.base_url, _short(str(exc))) from None
        except openai.APIStatusError as exc:
            hint = "check llm.model and llm.max_tokens"
            if schema is not None and exc.status_code in (400, 422):
                hint = ("if the server does not take this response_format, set llm.schema_style=json_object "
                        "(llama-cpp-python) or llm.json_schema=false")
            raise CpcxError(f"llm: {self.where} rejected the request (HTTP {exc.status_code}: "
                            f"{_short(exc.message)}); {hint}") from None
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            # A reply the client cannot parse (an HTML page with status 200 gives AttributeError in openai and
            # ValueError in langchain): not the server we expected, which no retry mends.
            raise mismatch(self.provider, self.cfg.base_url, f"{type(exc).__name__}: {_short(str(exc), 80)}") from None
        meta = message.response_metadata or {}
        return Reply(_text(message.content), meta.get("finish_reason"), _keep_meta(meta))


def _describe_openai(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return "timed out"
    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}"
    return _connection_reason(exc)


# ------------------------------------------------------------------------------------------- ollama
class OllamaProvider(ChatProvider):
    provider = "ollama"

    def _build(self, seed: int) -> Any:
        from langchain_ollama import ChatOllama

        return ChatOllama(
            model=self.cfg.model, base_url=self.cfg.base_url, temperature=self.cfg.temperature,
            seed=seed, num_predict=self.cfg.max_tokens, client_kwargs={"timeout": self.cfg.timeout_s},
        )

    def _invoke(self, model: Any, messages: list[dict[str, str]], schema: dict | None) -> Reply:
        import httpx
        import ollama

        try:
            # format=<schema>: Ollama constrains decoding to the schema (grammar), so the JSON is well formed.
            message = model.invoke(messages, format=schema) if schema else model.invoke(messages)
        except ollama.ResponseError as exc:
            # A 404 is "model not pulled" only when an Ollama server says it: an OpenAI-compatible server or a
            # web server answers /api/chat with 404 "Not Found" too.
            if exc.status_code == 404 and identify(self.cfg.base_url) != OLLAMA:
                raise mismatch(self.provider, self.cfg.base_url) from None
            if exc.status_code == 404 and "not found" in str(exc.error).lower():
                raise CpcxError(f"llm.model: model '{self.cfg.model}' is not pulled on the Ollama server at "
                                f"{self.cfg.base_url}; run `ollama pull {self.cfg.model}`") from None
            if exc.status_code >= 500 or exc.status_code == 429:
                raise TransientError(f"HTTP {exc.status_code}") from None
            raise CpcxError(f"llm: Ollama at {self.cfg.base_url} rejected the request (HTTP {exc.status_code}: "
                            f"{_short(str(exc.error))}); check llm.model and llm.json_schema") from None
        except httpx.TimeoutException:
            raise TransientError("timed out") from None
        except (ConnectionError, httpx.TransportError) as exc:
            raise TransientError(_connection_reason(exc)) from None
        except (ValueError, AttributeError, TypeError, KeyError) as exc:
            # JSONDecodeError (an HTML page) or pydantic's ValidationError (JSON of another API, e.g. an
            # OpenAI-compatible server): the base_url is not an Ollama server, which no retry mends.
            raise mismatch(self.provider, self.cfg.base_url, f"{type(exc).__name__}: {_short(str(exc), 80)}") from None
        meta = message.response_metadata or {}
        return Reply(_text(message.content), meta.get("done_reason"), _keep_meta(meta))


# ------------------------------------------------------------------------------------------- helpers
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)


def _keep_meta(meta: dict) -> dict:
    """Only what describes the model (no ids, timings or headers: they would make outputs differ per run)."""
    keep = {}
    for key in ("model_name", "model", "system_fingerprint"):
        if isinstance(meta.get(key), str):
            keep[key] = meta[key]
    return keep


def _connection_reason(exc: BaseException) -> str:
    """A few words on why a connection failed, from the innermost cause (the socket error)."""
    seen = [exc]
    while (nxt := seen[-1].__cause__ or seen[-1].__context__) is not None and nxt not in seen:
        seen.append(nxt)
    text = " ".join(str(e) for e in seen).lower()
    if "refused" in text or "failed to connect" in text or "errno 111" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in text:
        return "timed out"
    if "name or service" in text or "nodename" in text or "getaddrinfo" in text:
        return "unknown host"
    return _short(str(seen[-1])) or type(seen[-1]).__name__


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_provider(cfg: Any) -> ChatProvider:
    """The provider for an ``llm`` recipe section (``openai`` or ``ollama``; ``static`` needs none)."""
    factories: dict[str, Callable[[Any], ChatProvider]] = {"openai": OpenAIProvider, "ollama": OllamaProvider}
    if cfg.provider not in factories:
        raise CpcxError(f"llm.provider: '{cfg.provider}' does not call a model; use openai or ollama")
    return factories[cfg.provider](cfg)
