"""Hostile LLM endpoints (issue 19): a server that is not what the provider expects, and a server or model that
echoes the API key. Real HTTP servers on 127.0.0.1, reached through the real openai / langchain / ollama clients;
every failure must be one CpcxError line naming the URL, what answered and the fix, and the key's value must
appear in nothing cpcx prints or writes."""
from __future__ import annotations

import json

import pytest
import yaml
from fake_llm_server import FakeLLMServer, Status
from paths import VOC_ROOT

from cpcx.errors import CpcxError
from cpcx.llm import build_provider, check_llm
from cpcx.recipe import OllamaConfig, OpenAIConfig

HELLO = [{"role": "user", "content": "Group cat and dog."}]
KEY = "sk-hostile-0123456789abcdef"
pytestmark = pytest.mark.usefixtures("fast_backoff")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture
def html():
    with FakeLLMServer(html=True) as s:
        yield s


@pytest.fixture
def openai_only():
    with FakeLLMServer(apis=("openai",)) as s:
        yield s


def test_openai_answered_by_an_html_page(html):
    cfg = OpenAIConfig(model="fake-model", base_url=html.openai_url, max_retries=0)
    with pytest.raises(CpcxError) as info:
        build_provider(cfg).chat(HELLO, None)
    message = _one_line(info)
    assert message.startswith(f"llm.base_url: {html.openai_url} is a web page (HTML, HTTP 200)")
    assert "not an OpenAI-compatible server" in message and "point llm.base_url at the LLM server's API" in message
    ok, line = check_llm(cfg)  # cpcx doctor says the same (it raised AttributeError before)
    assert not ok and "is a web page" in line


def test_ollama_answered_by_an_html_page(html):
    cfg = OllamaConfig(model="fake-model", base_url=html.url, max_retries=0)
    with pytest.raises(CpcxError) as info:
        build_provider(cfg).chat(HELLO, None)
    assert "is a web page (HTML, HTTP 200), not an Ollama server" in _one_line(info)
    ok, line = check_llm(cfg)
    assert not ok and "is a web page" in line


def test_ollama_pointed_at_an_openai_compatible_server(openai_only):
    """vLLM-like: /api/chat is 404 "Not Found", which must not read as "model not pulled"."""
    cfg = OllamaConfig(model="fake-model", base_url=openai_only.url, max_retries=0)
    with pytest.raises(CpcxError) as info:
        build_provider(cfg).chat(HELLO, None)
    message = _one_line(info)
    assert message == (f"llm.base_url: {openai_only.url} is an OpenAI-compatible server, not an Ollama server; "
                       f"set llm.provider: openai with llm.base_url: {openai_only.url}/v1")
    ok, line = check_llm(cfg)
    assert not ok and "is an OpenAI-compatible server" in line


def test_ollama_pointed_at_a_proxy_that_answers_every_post():
    """A chat completion where Ollama's reply was expected: a pydantic ValidationError inside the client."""
    with FakeLLMServer(apis=("openai",), any_post_is_chat=True) as proxy:
        proxy.push("hello")
        cfg = OllamaConfig(model="fake-model", base_url=proxy.url, max_retries=2)
        with pytest.raises(CpcxError) as info:
            build_provider(cfg).chat(HELLO, None)
        assert "is an OpenAI-compatible server, not an Ollama server; set llm.provider: openai" in _one_line(info)
        assert len(proxy.chat_requests) == 1  # not retried: no retry mends the wrong kind of server


def test_openai_provider_pointed_at_the_root_of_an_openai_server(openai_only):
    """base_url without /v1: the POST goes to /chat/completions (404 JSON), the fix names the /v1 URL."""
    cfg = OpenAIConfig(model="fake-model", base_url=openai_only.url, max_retries=0)
    with pytest.raises(CpcxError) as info:
        build_provider(cfg).chat(HELLO, None)
    assert "HTTP 404" in _one_line(info)


# ------------------------------------------------------------------------------------ the key is redacted
def test_key_echoed_in_an_http_error_body_is_redacted(server, monkeypatch):
    monkeypatch.setenv("HOSTILE_KEY", KEY)
    server.push(Status(400, "bad request from {authorization}"))
    cfg = OpenAIConfig(model="fake-model", base_url=server.openai_url, api_key_env="HOSTILE_KEY", max_retries=0)
    with pytest.raises(CpcxError) as info:
        build_provider(cfg).chat(HELLO, None)
    message = _one_line(info)
    assert KEY not in message and "Bearer [redacted $HOSTILE_KEY]" in message
    assert server.chat_requests[0].headers["authorization"] == f"Bearer {KEY}"  # it was sent, only hidden


def _clusters_recipe(tmp_path, server, **clustering):
    from cpcx.recipe import load_recipe

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "name": "t", "runs_dir": str(tmp_path / "runs"), "dataset": {"kind": "voc", "root": str(VOC_ROOT)},
        "llm": {"provider": "openai", "model": "fake-model", "base_url": server.openai_url, "max_retries": 0,
                "api_key_env": "HOSTILE_KEY", "cache_dir": str(tmp_path / "cache")},
        "clustering": {"queries": 1, "refine": False, **clustering}}))
    return load_recipe(path, [])


def _files_hold_no_key(root) -> list:
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    return [str(p) for p in files if KEY.encode() in p.read_bytes()]


@pytest.mark.skipif(not VOC_ROOT.is_dir(), reason="VOC slice not found (set CPCX_DATA)")
def test_key_returned_by_the_model_is_redacted_in_cache_answers_and_clusters(tmp_path, server, monkeypatch):
    import io

    from rich.console import Console

    from cpcx.clusters import class_names, run_clusters

    monkeypatch.setenv("HOSTILE_KEY", KEY)
    recipe = _clusters_recipe(tmp_path, server)
    classes = class_names(recipe)
    # a valid answer whose cluster name is the Authorization header (the key)
    server.push(json.dumps({c: ("{authorization}" if i % 2 else "other") for i, c in enumerate(classes)}))
    console = Console(file=io.StringIO(), width=300)
    out = run_clusters(recipe, console=console)
    names = {c["name"] for c in json.loads(out.read_text())["clusters"]}
    assert "Bearer [redacted $HOSTILE_KEY]" in names
    assert _files_hold_no_key(tmp_path / "runs") == [] and _files_hold_no_key(tmp_path / "cache") == []
    assert KEY not in console.file.getvalue()


@pytest.mark.skipif(not VOC_ROOT.is_dir(), reason="VOC slice not found (set CPCX_DATA)")
def test_key_in_invalid_answers_is_redacted(tmp_path, server, monkeypatch):
    from cpcx.clusters import run_clusters

    monkeypatch.setenv("HOSTILE_KEY", KEY)
    recipe = _clusters_recipe(tmp_path, server, max_retries=1)
    server.push("my key is {authorization}", '{"cat": "{authorization}"}')
    with pytest.raises(CpcxError) as info:
        run_clusters(recipe)
    assert KEY not in str(info.value)
    report = tmp_path / "runs" / "t" / "clusters" / "invalid-answers.json"
    text = report.read_text()
    assert KEY not in text and "[redacted $HOSTILE_KEY]" in text


# ------------------------------------------------------------------------------------ more odd servers
class _Raw:
    """A server that answers every request with one fixed (status, content type, body)."""

    def __init__(self, status: int, kind: str, body: bytes):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("status, kind, body, expected", [
    (502, "text/html", b"<html>502 Bad Gateway</html>", "(HTTP 502) after 2 tries"),
    (200, "application/json", b"", "is a server that is neither Ollama nor OpenAI-compatible (HTTP 200"),
    (200, "application/json", b'{"id": "x", "object": "chat.completion"}', "is a server that is neither"),
    (200, "application/json", b"[1, 2, 3]", "is a server that is neither"),
    (200, "application/x-ndjson", b'{"message": 5}\nnot json\n', "is a server that is neither"),
    (200, "text/plain", b"x" * 100_000, "(HTTP 200, text/plain); fix llm.base_url or llm.provider"),
])
@pytest.mark.parametrize("provider", ["openai", "ollama"])
def test_odd_replies_are_one_line(status, kind, body, expected, provider):
    raw = _Raw(status, kind, body)
    try:
        cfg = (OpenAIConfig(model="m", base_url=raw.url + "/v1", max_retries=1, timeout_s=3) if provider == "openai"
               else OllamaConfig(model="m", base_url=raw.url, max_retries=1, timeout_s=3))
        with pytest.raises(CpcxError) as info:
            build_provider(cfg).chat(HELLO, None)
        assert expected in _one_line(info)
        ok, line = check_llm(cfg, timeout=2)
        assert not ok and "\n" not in line
    finally:
        raw.close()
