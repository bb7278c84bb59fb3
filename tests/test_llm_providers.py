"""Providers and ``check_llm`` through the real langchain-openai, langchain-ollama and ollama clients, against a
scripted HTTP server on 127.0.0.1 (tests/fake_llm_server.py)."""
from __future__ import annotations

import socket

import pytest
from fake_llm_server import Hang, Reply, Status

from cpcx.errors import CpcxError
from cpcx.llm import build_provider, check_llm
from cpcx.recipe import OllamaConfig, OpenAIConfig

HELLO = [{"role": "system", "content": "Answer with JSON."}, {"role": "user", "content": "Group cat and dog."}]
pytestmark = pytest.mark.usefixtures("fast_backoff")
SCHEMA = {"type": "object", "properties": {"cat": {"type": "string"}, "dog": {"type": "string"}},
          "required": ["cat", "dog"], "additionalProperties": False}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def openai_cfg(url: str, **kw) -> OpenAIConfig:
    return OpenAIConfig(model="fake-model", base_url=url, timeout_s=kw.pop("timeout_s", 5.0), **kw)


def ollama_cfg(url: str, **kw) -> OllamaConfig:
    return OllamaConfig(model=kw.pop("model", "fake-model"), base_url=url, timeout_s=kw.pop("timeout_s", 5.0), **kw)


# ------------------------------------------------------------------------------------------ openai
def test_openai_request_carries_the_settings_and_the_key(server, monkeypatch):
    monkeypatch.setenv("MY_LLM_KEY", "sk-test-abc123")
    server.push('{"cat": "animal", "dog": "animal"}')
    reply = build_provider(openai_cfg(server.openai_url, api_key_env="MY_LLM_KEY", seed=7, max_tokens=300)).chat(
        HELLO, SCHEMA)
    assert reply.text == '{"cat": "animal", "dog": "animal"}' and reply.finish_reason == "stop"
    (request,) = server.chat_requests
    body = request.body
    assert body["temperature"] == 0 and body["seed"] == 7
    assert body["max_tokens"] == 300 and body["max_completion_tokens"] == 300  # llama.cpp reads only max_tokens
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"] == SCHEMA and body["messages"][1]["role"] == "user"
    assert request.headers["authorization"] == "Bearer sk-test-abc123"


def test_openai_json_object_style_for_llama_cpp(server):
    server.push("{}")
    build_provider(openai_cfg(server.openai_url, schema_style="json_object")).chat(HELLO, SCHEMA)
    assert server.chat_requests[0].body["response_format"] == {"type": "json_object", "schema": SCHEMA}


def test_openai_retries_a_500_and_a_hang(server):
    server.push(Status(500), "first", Hang(1.5), "second")
    provider = build_provider(openai_cfg(server.openai_url, timeout_s=0.5, max_retries=2))
    assert provider.chat(HELLO, None).text == "first"
    assert provider.chat(HELLO, None).text == "second"
    assert provider.calls == 4 and len(server.chat_requests) == 4


def test_openai_gives_up_with_one_line(server):
    server.push(Hang(1.5), Hang(1.5))
    with pytest.raises(CpcxError) as info:
        build_provider(openai_cfg(server.openai_url, timeout_s=0.4, max_retries=1)).chat(HELLO, None)
    assert "timed out" in str(info.value) and "after 2 tries" in str(info.value) and "\n" not in str(info.value)

    server.push(Status(401, "bad key"))
    with pytest.raises(CpcxError, match="refused the key"):
        build_provider(openai_cfg(server.openai_url)).chat(HELLO, None)
    server.push(Status(422, "response_format: unsupported"))
    with pytest.raises(CpcxError, match="schema_style=json_object"):
        build_provider(openai_cfg(server.openai_url)).chat(HELLO, SCHEMA)


def test_openai_truncated_structured_answer_is_returned_not_raised(server):
    server.push(Reply('{"cat": "ani', finish_reason="length"))
    reply = build_provider(openai_cfg(server.openai_url)).chat(HELLO, SCHEMA)
    assert reply.finish_reason == "length" and reply.text == '{"cat": "ani'


def test_unreachable_servers_fail_in_one_line():
    port = closed_port()
    for cfg in (openai_cfg(f"http://127.0.0.1:{port}/v1", max_retries=1),
                ollama_cfg(f"http://127.0.0.1:{port}", max_retries=1)):
        with pytest.raises(CpcxError) as info:
            build_provider(cfg).chat(HELLO, None)
        message = str(info.value)
        assert message.startswith("llm.base_url:") and "connection refused" in message and f":{port}" in message
        ok, line = check_llm(cfg, timeout=1.0)
        assert not ok and "not reachable (connection refused)" in line


def test_openai_without_a_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(CpcxError, match="OPENAI_API_KEY is not set"):
        build_provider(OpenAIConfig(model="gpt-4o")).chat(HELLO, None)
    ok, line = check_llm(OpenAIConfig(model="gpt-4o"))
    assert not ok and "OPENAI_API_KEY is not set" in line


def test_check_llm_openai(server):
    assert check_llm(openai_cfg(server.openai_url)) == (True, f"{server.openai_url} serves fake-model")
    ok, line = check_llm(OpenAIConfig(model="other", base_url=server.openai_url))
    assert not ok and "does not list model 'other'" in line and "fake-model" in line


# ------------------------------------------------------------------------------------------ ollama
def test_ollama_sends_the_schema_as_format_and_retries(server):
    server.push(Status(500), '{"cat": "animal", "dog": "animal"}' + " " * 50)  # streamed in several pieces
    provider = build_provider(ollama_cfg(server.url, seed=3, max_tokens=200))
    reply = provider.chat(HELLO, SCHEMA)
    assert reply.text.strip() == '{"cat": "animal", "dog": "animal"}' and provider.calls == 2
    body = server.chat_requests[-1].body
    assert body["format"] == SCHEMA
    assert body["options"]["temperature"] == 0 and body["options"]["seed"] == 3
    assert body["options"]["num_predict"] == 200


def test_ollama_hang_past_the_timeout(server):
    server.push(Hang(1.5), "ok")
    assert build_provider(ollama_cfg(server.url, timeout_s=0.5)).chat(HELLO, None).text == "ok"


def test_ollama_model_not_pulled(server):
    with pytest.raises(CpcxError, match=r"not pulled .* run `ollama pull qwen2.5:7b-instruct`"):
        build_provider(ollama_cfg(server.url, model="qwen2.5:7b-instruct")).chat(HELLO, None)
    ok, line = check_llm(ollama_cfg(server.url, model="qwen2.5:7b-instruct"))
    assert not ok and "ollama pull qwen2.5:7b-instruct" in line
    assert check_llm(ollama_cfg(server.url)) == (True, f"Ollama at {server.url} serves fake-model")
    assert {r.path for r in server.requests} >= {"/api/tags", "/api/show", "/api/chat"}
