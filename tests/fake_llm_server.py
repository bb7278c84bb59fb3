"""A scripted LLM server on 127.0.0.1 for tests: OpenAI's and Ollama's HTTP APIs, real sockets.

It speaks ``POST /v1/chat/completions`` and ``GET /v1/models`` (OpenAI, as ChatOpenAI and the openai client
call them) and ``POST /api/chat`` (streamed NDJSON or one object), ``GET /api/tags`` and ``POST /api/show``
(Ollama, as ChatOllama and the ollama client call them). Answers come from a script, one per chat request,
in order; every request is recorded so tests can count calls and look at what was sent.

    with FakeLLMServer() as server:
        server.push('{"cat": "animal"}', Status(500), Hang(2.0), Reply("...", finish_reason="length"))
        ...  # point llm.base_url at server.openai_url or server.url

``apis`` narrows what it speaks (``("openai",)``: an OpenAI-compatible server such as vLLM, whose /api/* routes
are 404 "Not Found"); ``any_post_is_chat`` answers every POST with a chat completion (a proxy that ignores the
path); ``html=True`` answers every request with a web page and status 200. ``{authorization}`` in a scripted
text or error message is replaced by the request's Authorization header (a server that echoes the key).
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Union


@dataclass
class Reply:
    text: str
    finish_reason: str = "stop"


@dataclass
class Status:
    """Answer this HTTP status with an error body (500: a transient server error)."""

    code: int
    message: str = "scripted failure"


@dataclass
class Hang:
    """Sleep this long before answering (the client should have given up by then)."""

    seconds: float


Scripted = Union[str, Reply, Status, Hang]


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any


class FakeLLMServer:
    def __init__(self, models: tuple[str, ...] = ("fake-model",), apis: tuple[str, ...] = ("openai", "ollama"),
                 any_post_is_chat: bool = False, html: bool = False):
        self.models = list(models)
        self.apis, self.any_post_is_chat, self.html = apis, any_post_is_chat, html
        self.script: deque[Scripted] = deque()
        self.default: Callable[[Request], Scripted] | None = None
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    # -------------------------------------------------------------------------------- control
    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:  # Ollama's base_url
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:  # ChatOpenAI's base_url
        return f"{self.url}/v1"

    def push(self, *items: Scripted) -> None:
        with self._lock:
            self.script.extend(items)

    @property
    def chat_requests(self) -> list[Request]:
        return [r for r in self.requests if r.path in ("/v1/chat/completions", "/api/chat")]

    def __enter__(self) -> "FakeLLMServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next(self, request: Request) -> Scripted:
        with self._lock:
            if self.script:
                return self.script.popleft()
        if self.default is not None:
            return self.default(request)
        return Status(500, "the test script has no answer left")


def _handler(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output clean
            pass

        def _body(self) -> Any:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                return json.loads(raw) if raw else None
            except ValueError:
                return raw.decode("utf-8", "replace")

        def _send(self, code: int, payload: Any, content_type: str = "application/json") -> None:
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts)
                pass

        def _record(self, method: str) -> Request:
            headers = {k.lower(): v for k, v in self.headers.items()}
            request = Request(method, self.path.split("?")[0], headers, self._body())
            with server._lock:
                server.requests.append(request)
            return request

        def _page(self) -> bool:
            if not server.html:
                return False
            self._send(200, b"<!doctype html><html><body><h1>Welcome to nginx!</h1></body></html>", "text/html")
            return True

        def _unserved(self, path: str) -> bool:
            """404 as an OpenAI-only server answers a route of Ollama's API (vLLM/FastAPI's body)."""
            if path.startswith("/api/") and "ollama" not in server.apis:
                self._send(404, {"detail": "Not Found"})
                return True
            return False

        def do_GET(self) -> None:
            request = self._record("GET")
            if self._page() or self._unserved(request.path):
                return
            if request.path == "/v1/models":
                self._send(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in server.models]})
            elif request.path == "/api/tags":
                self._send(200, {"models": [_ollama_model(m) for m in server.models]})
            else:
                self._send(404, {"error": f"no route {request.path}"})

        def do_POST(self) -> None:
            request = self._record("POST")
            if self._page():
                return
            if server.any_post_is_chat and request.path != "/v1/chat/completions":
                request = Request(request.method, "/v1/chat/completions", request.headers, request.body)
            if self._unserved(request.path):
                return
            if request.path == "/api/show":
                name = (request.body or {}).get("model", "")
                if name in server.models:
                    self._send(200, {"modelfile": "", "parameters": "", "template": "", "details": {},
                                     "model_info": {}})
                else:
                    self._send(404, {"error": f"model '{name}' not found"})
                return
            if request.path not in ("/v1/chat/completions", "/api/chat"):
                self._send(404, {"error": f"no route {request.path}"})
                return
            model = (request.body or {}).get("model", "")
            if request.path == "/api/chat" and model not in server.models:
                self._send(404, {"error": f"model \"{model}\" not found, try pulling it first"})
                return
            item = server._next(request)
            if isinstance(item, Hang):
                time.sleep(item.seconds)
                self._send(500, {"error": "answered too late"})
                return
            auth = request.headers.get("authorization", "")
            if isinstance(item, Status):
                message = item.message.replace("{authorization}", auth)
                self._send(item.code, {"error": {"message": message, "type": "server_error"}}
                           if request.path.startswith("/v1") else {"error": message})
                return
            reply = item if isinstance(item, Reply) else Reply(item)
            reply = Reply(reply.text.replace("{authorization}", auth), reply.finish_reason)
            if request.path == "/v1/chat/completions":
                self._send(200, _openai_completion(model, reply))
            else:
                self._ollama_chat(model, reply, (request.body or {}).get("stream", True))

        def _ollama_chat(self, model: str, reply: Reply, stream: bool) -> None:
            done = {"model": model, "created_at": "2025-01-01T00:00:00Z", "done": True,
                    "done_reason": reply.finish_reason, "total_duration": 1, "load_duration": 1,
                    "prompt_eval_count": 1, "prompt_eval_duration": 1, "eval_count": 1, "eval_duration": 1}
            if not stream:
                self._send(200, {**done, "message": {"role": "assistant", "content": reply.text}})
                return
            # Streamed NDJSON as Ollama sends it: the text in pieces, then a final "done" object.
            pieces = [reply.text[i:i + 40] for i in range(0, len(reply.text), 40)] or [""]
            lines = [{"model": model, "created_at": "2025-01-01T00:00:00Z", "done": False,
                      "message": {"role": "assistant", "content": p}} for p in pieces]
            lines.append({**done, "message": {"role": "assistant", "content": ""}})
            self._send(200, "".join(json.dumps(x) + "\n" for x in lines).encode(), "application/x-ndjson")

    return Handler


def _openai_completion(model: str, reply: Reply) -> dict:
    return {
        "id": "chatcmpl-fake", "object": "chat.completion", "created": 0, "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": reply.text},
                     "finish_reason": reply.finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _ollama_model(name: str) -> dict:
    return {"name": name, "model": name, "modified_at": "2025-01-01T00:00:00Z", "size": 1, "digest": "0" * 64,
            "details": {"format": "gguf", "family": "fake", "parameter_size": "1M", "quantization_level": "Q4"}}
