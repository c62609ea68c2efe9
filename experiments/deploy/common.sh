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
# is_loopback HOST: true for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)
is_loopback() {
    [[ "$1" == localhost || "$1" == "::1" || "$1" == "[::1]" || "$1" =~ ^127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]]
}
# check_exposure ENGINE: an API that listens beyond this machine (HOST not loopback) needs a key (API_KEY, from
# --api-key or the environment); the key goes in the scripts' own --api-key, where it stays off the printed command
check_exposure() {
    [[ " ${EXTRA[*]-} " != *" --api-key "* && " ${EXTRA[*]-} " != *" --api-key="* ]] \
        || die "give the key with this script's --api-key (before '--', or SLIM_API_KEY): it keeps the key off
the printed command"
    if ! is_loopback "$HOST" && [[ -z "$API_KEY" ]]; then
        die "--host $HOST serves the $1 API to every machine that reaches this one, with no authentication: pass
--api-key KEY or export SLIM_API_KEY (e.g. export SLIM_API_KEY=\$(openssl rand -hex 32); clients send
'Authorization: Bearer KEY'), or leave --host out to listen on 127.0.0.1 only"
    fi
}
# print_command PREFIX: the command (CMD) as it runs, shell-quoted, with the API key's value shown as REDACTED
print_command() {
    local shown=() hide=0 a
    for a in "${CMD[@]}"; do
        if [[ "$hide" -eq 1 ]]; then shown+=(REDACTED); hide=0; else shown+=("$a"); fi
        [[ "$a" != "--api-key" ]] || hide=1
    done
    printf '%s: running:' "$1"; printf ' %q' "${shown[@]}"; printf '\n'
}
