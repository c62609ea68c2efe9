# Shared by run_vllm.sh, run_sglang.sh and run_trtllm.sh (sourced after each defines usage()): the argument checks
# and the checkpoint directory that comes first. Every refusal exits 2 with one line naming the fix.
SCRIPT="$(basename "$0")"
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value (see --help)"; }
need_int() { [[ "$2" =~ ^[0-9]+$ && "$2" -ge "${3:-1}" ]] || die "$1 must be an integer >= ${3:-1}, got '$2'"; }
# check_first_arg "$@": --help prints the usage; otherwise the first argument is the checkpoint directory
check_first_arg() {
    [[ $# -ge 1 ]] || { usage >&2; exit 2; }
    case "$1" in -h|--help) usage; exit 0 ;; esac
    [[ "$1" != -* ]] || die "the first argument is the checkpoint directory, got '$1' (see --help)"
}
# check_checkpoint: CKPT is a directory slim exported (config.json and safetensors weights); made absolute
check_checkpoint() {
    [[ -d "$CKPT" ]] || die "checkpoint directory '$CKPT' does not exist"
    CKPT="$(cd "$CKPT" && pwd)"
    [[ -f "$CKPT/config.json" ]] || die "'$CKPT' has no config.json: pass the checkpoint directory slim exported (RUN_DIR/checkpoint)"
    compgen -G "$CKPT/*.safetensors" >/dev/null || die "'$CKPT' has no *.safetensors weights (an unfinished export?)"
}
# detect_gpus: GPUS (visible to this node: CUDA_VISIBLE_DEVICES, else nvidia-smi) and CAP (compute capability, or empty)
detect_gpus() {
    GPUS=0 CAP=""
    if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
        [[ -z "$CUDA_VISIBLE_DEVICES" ]] || GPUS=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    elif command -v nvidia-smi >/dev/null 2>&1; then
        GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        CAP="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ' || true)"
    fi
}
