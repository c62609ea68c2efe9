#!/usr/bin/env bash
# Serve a static W4A8 checkpoint (scheme=w4a8 scheme.format=w4afp8) with TensorRT-LLM's PyTorch backend
# (trtllm-serve, OpenAI-compatible). TensorRT-LLM reads hf_quant_config.json (MIXED_PRECISION) and quant_cfg.json
# (W4A8_AWQ experts, FP8_BLOCK_SCALES the rest), which slim writes beside config.json.
#
#   experiments/deploy/run_trtllm.sh CHECKPOINT [options] [-- extra trtllm-serve arguments]
#
# One node, 8 GPUs (Hopper, or Ada for the MoE kernels), experts whole per GPU:
#   experiments/deploy/run_trtllm.sh outputs/.../checkpoint --tp 8 --ep 8
# Two nodes x 8 GPUs: one MPI job of 16 ranks, started on node 0 (the checkpoint path the same on both nodes):
#   experiments/deploy/run_trtllm.sh CKPT --tp 16 --ep 16 --launcher "mpirun -np 16 -H NODE0:8,NODE1:8"
# The API listens on 127.0.0.1 only: this script passes trtllm-serve no API key, so it refuses any other --host;
# serve other machines through an authenticating proxy in front of it.
#   (under SLURM: --launcher "srun -N 2 --ntasks-per-node 8 --mpi=pmix")
#
# What it refuses, and why, is in experiments/deploy/w4afp8_check.py and docs/w4afp8.md.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo; cat <<'EOF'
Options:
  --tp N              tensor parallel size over all ranks (default: the GPUs visible on this node)
  --ep N              expert parallel size (default: --tp)
  --launcher "CMD"    multi-node MPI launcher prefix; trtllm-llmapi-launch then starts trtllm-serve on every rank
  --host HOST         address the API listens on: a loopback address (default 127.0.0.1)
  --port PORT         API port (default 8000)
  --trtllm-serve CMD  the trtllm-serve executable (default: trtllm-serve on PATH)
  --dry-run           check the inputs, print the command and exit
  -h, --help          this text
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_first_arg "$@"
CKPT="$1"; shift

TP="" EP="" LAUNCHER="" HOST=127.0.0.1 PORT=8000 SERVE=trtllm-serve DRY=0 EXTRA=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tp) need_value "$@"; need_int "$1" "$2"; TP="$2"; shift 2 ;;
        --ep) need_value "$@"; need_int "$1" "$2"; EP="$2"; shift 2 ;;
        --launcher) need_value "$@"; LAUNCHER="$2"; shift 2 ;;
        --host) need_value "$@"; HOST="$2"; shift 2 ;;
        --port) need_value "$@"; need_int "$1" "$2"; PORT="$2"; shift 2 ;;
        --trtllm-serve) need_value "$@"; SERVE="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (trtllm-serve's own arguments go after '--'; see --help)" ;;
    esac
done

is_loopback "$HOST" || die "--host $HOST would serve TensorRT-LLM's API to every machine that reaches this one with no
authentication (this script passes trtllm-serve no API key): leave --host out (127.0.0.1) and put an authenticating
proxy in front of it"
check_checkpoint

detect_gpus
if [[ -z "$TP" ]]; then TP=$(( GPUS > 0 ? GPUS : 1 )); fi
if [[ -z "$EP" ]]; then EP="$TP"; fi
if [[ -z "$LAUNCHER" && "$GPUS" -gt 0 && "$TP" -gt "$GPUS" ]]; then
    die "--tp $TP needs $TP GPUs but this node shows $GPUS: span nodes with --launcher (see --help)"
fi

CHECK=("$(command -v python3 || echo python)" "$(dirname "$0")/w4afp8_check.py" "$CKPT" --engine trtllm --tp "$TP" --ep "$EP")
[[ -z "$CAP" ]] || CHECK+=(--capability "$CAP")
SUMMARY="$("${CHECK[@]}" 2>&1)" || die "$SUMMARY"
[[ -n "$CAP" ]] || echo "run_trtllm.sh: warning: no nvidia-smi here, GPU capability not checked (TensorRT-LLM's W4AFP8 MoE runs on SM89/SM90)" >&2

CMD=()
if [[ -n "$LAUNCHER" ]]; then read -r -a CMD <<<"$LAUNCHER"; CMD+=(trtllm-llmapi-launch); fi
CMD+=("$SERVE" serve "$CKPT" --backend pytorch --tp_size "$TP" --ep_size "$EP" --host "$HOST" --port "$PORT" "${EXTRA[@]}")

echo "run_trtllm.sh: $SUMMARY"
echo "run_trtllm.sh: API at http://$HOST:$PORT/v1 once every rank is up"
printf 'run_trtllm.sh: running:'; printf ' %q' "${CMD[@]}"; printf '\n'
[[ "$DRY" -eq 0 ]] || exit 0
exec "${CMD[@]}"
