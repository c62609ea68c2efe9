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
