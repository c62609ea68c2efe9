#!/usr/bin/env bash
# Serve a static W4A8 checkpoint (scheme=w4a8 scheme.format=w4afp8) with SGLang's OpenAI-compatible server.
#
#   experiments/deploy/run_sglang.sh CHECKPOINT [options] [-- extra sglang.launch_server arguments]
#
# The API listens on 127.0.0.1 (this machine only) unless --host says otherwise; any other address needs an API key
# (--api-key KEY or SLIM_API_KEY; clients send "Authorization: Bearer KEY"), else the script refuses.
#
# One node, 8 Hopper GPUs, experts split whole over the GPUs (expert parallel), attention tensor parallel,
# served to other machines:
#   export SLIM_API_KEY=$(openssl rand -hex 32)
#   experiments/deploy/run_sglang.sh outputs/.../checkpoint --tp 8 --ep 8 --host 0.0.0.0
# Two nodes x 8 GPUs (one server over 16 GPUs; the checkpoint path must be the same on both nodes; SLIM_API_KEY set):
#   node 0: experiments/deploy/run_sglang.sh CKPT --tp 16 --ep 16 --nnodes 2 --node-rank 0 --dist-init-addr NODE0_IP:5000 --host 0.0.0.0
#   node 1: experiments/deploy/run_sglang.sh CKPT --tp 16 --ep 16 --nnodes 2 --node-rank 1 --dist-init-addr NODE0_IP:5000
#
# SGLang lives in its own environment: pass its interpreter with --python or SLIM_SGLANG_PYTHON.
# What it refuses, and why, is in experiments/deploy/w4afp8_check.py and docs/w4afp8.md.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo; cat <<'EOF'
Options:
  --tp N                  tensor parallel size over all nodes (default: the GPUs visible on this node)
  --ep N                  expert parallel size (default: --tp: whole experts per GPU, which R1 needs beyond tp 4)
  --nnodes N              nodes serving this one model (default 1)
  --node-rank R           this node's rank, 0..N-1
  --dist-init-addr A:P    node 0's address and a free port (needed with --nnodes > 1)
  --host HOST             address the API listens on (default 127.0.0.1; any other address needs an API key)
  --api-key KEY           key clients must send (Authorization: Bearer KEY); default $SLIM_API_KEY. Passed as
                          SGLang's --api-key (sglang/srt/server_args.py ServerArgs.api_key); printed as REDACTED
  --port PORT             API port (default 30000)
  --python PY             python of the SGLang environment (default: $SLIM_SGLANG_PYTHON, else python3 on PATH)
  --dry-run               check the inputs, print the command and exit
  -h, --help              this text
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_first_arg "$@"
CKPT="$1"; shift

TP="" EP="" NNODES=1 NODE_RANK=0 INIT="" HOST=127.0.0.1 PORT=30000 PY="${SLIM_SGLANG_PYTHON:-}" DRY=0 EXTRA=()
API_KEY="${SLIM_API_KEY:-}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tp) need_value "$@"; need_int "$1" "$2"; TP="$2"; shift 2 ;;
        --ep) need_value "$@"; need_int "$1" "$2"; EP="$2"; shift 2 ;;
        --nnodes) need_value "$@"; need_int "$1" "$2"; NNODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; need_int "$1" "$2" 0; NODE_RANK="$2"; shift 2 ;;
        --dist-init-addr) need_value "$@"; INIT="$2"; shift 2 ;;
        --host) need_value "$@"; HOST="$2"; shift 2 ;;
        --api-key) need_value "$@"; API_KEY="$2"; shift 2 ;;
        --port) need_value "$@"; need_int "$1" "$2"; PORT="$2"; shift 2 ;;
        --python) need_value "$@"; PY="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (SGLang's own arguments go after '--'; see --help)" ;;
    esac
done

check_checkpoint
check_exposure SGLang
if [[ " ${EXTRA[*]} " == *" --speculative-algorithm "* ]]; then
    die "slim's w4afp8 checkpoint has no multi-token-prediction layer (it is not exported), so SGLang's NEXTN/EAGLE
speculative decoding has no draft weights: leave --speculative-algorithm out"
fi

if [[ -z "$PY" ]]; then PY="$(command -v python3 || true)"; fi
{ [[ -n "$PY" ]] && command -v "$PY" >/dev/null; } || die "no python found for SGLang: pass --python /path/to/sglang-env/bin/python or set SLIM_SGLANG_PYTHON"

detect_gpus
if [[ -z "$TP" ]]; then TP=$(( GPUS > 0 ? GPUS * NNODES : 1 )); fi
if [[ -z "$EP" ]]; then EP="$TP"; fi
if [[ "$NNODES" -gt 1 ]]; then
    [[ -n "$INIT" ]] || die "--nnodes $NNODES needs --dist-init-addr NODE0_IP:PORT (reachable from every node)"
    [[ "$NODE_RANK" -lt "$NNODES" ]] || die "--node-rank must be 0..$(( NNODES - 1 )), got $NODE_RANK"
    [[ $(( TP % NNODES )) -eq 0 ]] || die "--tp $TP cannot be split evenly over $NNODES nodes"
elif [[ "$NODE_RANK" -ne 0 ]]; then
    die "--node-rank needs --nnodes > 1"
fi
if [[ "$GPUS" -gt 0 && $(( TP / NNODES )) -gt "$GPUS" ]]; then
    die "--tp $TP over $NNODES node(s) needs $(( TP / NNODES )) GPUs per node but this node shows $GPUS"
fi

CHECK=(python3 "$(dirname "$0")/w4afp8_check.py" "$CKPT" --engine sglang --tp "$TP" --ep "$EP")
[[ -z "$CAP" ]] || CHECK+=(--capability "$CAP")
command -v python3 >/dev/null || CHECK[0]="$PY"
SUMMARY="$("${CHECK[@]}" 2>&1)" || die "$SUMMARY"
[[ -n "$CAP" ]] || echo "run_sglang.sh: warning: no nvidia-smi here, GPU capability not checked (SGLang's W4AFP8 MoE runs on Hopper, 9.0)" >&2

CMD=("$PY" -m sglang.launch_server --model-path "$CKPT" --quantization w4afp8 --tp-size "$TP" --ep-size "$EP")
if [[ "$NNODES" -gt 1 ]]; then CMD+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --dist-init-addr "$INIT"); fi
CMD+=(--host "$HOST" --port "$PORT")
[[ -z "$API_KEY" ]] || CMD+=(--api-key "$API_KEY")
CMD+=("${EXTRA[@]}")

echo "run_sglang.sh: $SUMMARY"
if [[ "$NODE_RANK" -eq 0 ]]; then echo "run_sglang.sh: API at http://$HOST:$PORT/v1 once node(s) are up"; fi
print_command run_sglang.sh
[[ "$DRY" -eq 0 ]] || exit 0
exec "${CMD[@]}"
