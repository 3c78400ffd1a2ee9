#!/usr/bin/env bash
# GPU acceptance check (benchmarks/gpu_check.py): the CUDA paths of finetune on SmolLM2-135M- and ~1B-shaped
# random models; prints a table and writes benchmarks/out/gpu_check.json. Under 8 minutes on one H100-class GPU.
#
#   bash benchmarks/gpu_check.sh                  # everything
#   bash benchmarks/gpu_check.sh --dry-run        # the plan only; no GPU needed
#   bash benchmarks/gpu_check.sh --help           # the options
#
# First, unless flash_attn already imports, one `pip install flash-attn` attempt of at most
# FLASH_ATTN_TIMEOUT_S seconds (default 60) that is allowed to fail: its outcome is printed and recorded, and
# the flash-attn check is skipped without it. GPU_CHECK_INSTALL_FLASH_ATTN=0 skips the attempt; PYTHON picks
# the interpreter (default: python).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
timeout_s="${FLASH_ATTN_TIMEOUT_S:-60}"

planning_only=0
for arg in "$@"; do
  case "$arg" in --dry-run|-h|--help) planning_only=1 ;; esac
done

if "$python" -c "import flash_attn" >/dev/null 2>&1; then
  install="already installed"
elif (( planning_only )); then
  install="not attempted (--dry-run or --help)"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
  install="not attempted (no nvidia-smi: no CUDA GPU here)"
elif [[ "${GPU_CHECK_INSTALL_FLASH_ATTN:-1}" == "0" ]]; then
  install="not attempted (GPU_CHECK_INSTALL_FLASH_ATTN=0)"
else
  log="$(mktemp "${TMPDIR:-/tmp}/flash-attn-install.XXXXXX")"
  echo "flash-attn: trying pip install (at most ${timeout_s} s; allowed to fail; log: $log)"
  rc=0
  timeout -k 10 "$timeout_s" "$python" -m pip install --no-build-isolation flash-attn >"$log" 2>&1 || rc=$?
  if (( rc == 0 )); then
    install="installed by this run"
  elif (( rc == 124 || rc == 137 )); then
    install="failed: timed out after ${timeout_s} s (log: $log)"
  else
    install="failed: pip exited $rc: $(tail -n 1 "$log") (log: $log)"
  fi
fi
echo "flash-attn: $install"
export GPU_CHECK_FLASH_ATTN_INSTALL="$install"

# finetune and benchmarks import from the repository root, wherever this is run from
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m benchmarks.gpu_check "$@"
