"""Train slim's embedded tiny DeepSeek-V3 model on the shipped Wikipedia train split, then export it.

    python experiments/tiny_model/prepare_data.py   # text, tokenizer, slim/assets/data
    python experiments/tiny_model/train.py          # ~30 min on 2 CPU threads; writes slim/assets/tiny_deepseek

fp32 on CPU, AdamW with linear warmup + cosine decay, seq_len 256, fixed seeds. MoE load is balanced the
DeepSeek-V3 way, without an auxiliary loss: after every step each MoE layer's
``mlp.gate.e_score_correction_bias`` moves by +-gamma towards balanced expert load (it only affects which
experts are picked, not their weights). The fp32 checkpoint and metrics go to experiments/tiny_model/work/,
then export.py writes the DeepSeek-R1-style FP8 checkpoint and evaluates it.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import common  # sets thread counts / offline env before torch is imported
import torch
from safetensors.torch import save_file
from tqdm import tqdm


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--grad-clip", type=float, default=1.0)
    ap.add_argument("--bias-gamma", type=float, default=1e-3, help="aux-loss-free balancing step")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--experts-implementation", default="eager", choices=["eager", "grouped_mm"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timing-only", action="store_true", help="run --steps steps, report speed, save nothing")
    ap.add_argument("--no-export", action="store_true", help="stop after saving the fp32 checkpoint")
    return ap.parse_args()


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def batches(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int):
    """Endless [B, seq_len] batches: each epoch a new random offset and a new shuffle of the windows."""
    g = torch.Generator().manual_seed(seed)
    epoch = 0
    while True:
        offset = int(torch.randint(0, seq_len, (1,), generator=g))
        n = (stream.numel() - offset) // seq_len
        windows = stream[offset : offset + n * seq_len].view(n, seq_len)
        perm = torch.randperm(n, generator=g)
        for s in range(0, n - batch_size + 1, batch_size):
            yield epoch, windows[perm[s : s + batch_size]]
        epoch += 1


@torch.no_grad()
def balance_experts(model, recorder: common.ExpertLoadRecorder, gamma: float) -> None:
    """DeepSeek-V3 auxiliary-loss-free balancing: b_i += gamma * sign(mean load - load_i)."""
    for i, counts in recorder.counts.items():
        load = counts.float()
        model.model.layers[i].mlp.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


def load_stats(recorder: common.ExpertLoadRecorder) -> dict:
    out = {}
    for i, counts in recorder.counts.items():
        frac = counts.double() / counts.sum()
        out[f"layer_{i}"] = {
            "fraction_per_expert": [round(float(f), 4) for f in frac],
            "max_over_mean": round(float(frac.max() * frac.numel()), 3),
            "min_over_mean": round(float(frac.min() * frac.numel()), 3),
            "experts_without_tokens": int((counts == 0).sum()),
        }
    return out


def main() -> None:
    args = parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # progress visible when logging to a file
    from transformers import DeepseekV3ForCausalLM

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    tok = common.load_tokenizer()
    train_docs = [r["text"] for r in common.read_jsonl(common.WORK / "train.jsonl")]
    held_docs = [r["text"] for r in common.read_jsonl(common.WORK / "heldout.jsonl")]
    train_stream = common.token_stream(tok, train_docs)
    held_windows = common.eval_windows(common.token_stream(tok, held_docs))
    held_mask = common.target_mask(held_windows, tok.bos_token_id)
    config = common.build_config()
    print(f"train tokens {train_stream.numel():,}; held-out windows {tuple(held_windows.shape)}, "
          f"scored tokens {int(held_mask.sum()):,}", flush=True)

    model = DeepseekV3ForCausalLM._from_config(
        config, attn_implementation="sdpa", experts_implementation=args.experts_implementation
    )
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters {n_params:,}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    recorder = common.ExpertLoadRecorder(model)
    data = batches(train_stream, args.batch_size, common.SEQ_LEN, seed=args.seed + 1)
    losses, evals = [], []
    t0 = time.time()
    bar = tqdm(range(args.steps), mininterval=20, file=sys.stdout, dynamic_ncols=False, ncols=110)
    for step in bar:
        epoch, x = next(data)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        recorder.reset()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        balance_experts(model, recorder, args.bias_gamma)
        losses.append(loss.item())
        if step % 10 == 0:
            imb = max(float(c.max()) / max(1.0, float(c.float().mean())) for c in recorder.counts.values())
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", ep=epoch,
                            lr=f"{lr_at(step, args):.1e}", gn=f"{float(gnorm):.2f}", maxload=f"{imb:.2f}")
        if not args.timing_only and args.eval_every and (step + 1) % args.eval_every == 0:
            recorder.reset()
            h = common.ppl(*common.heldout_nll(model, held_windows, held_mask))
            max_load = max(v["max_over_mean"] for v in load_stats(recorder).values())
            evals.append({"step": step + 1, "train_loss": sum(losses[-50:]) / len(losses[-50:]), "heldout_ppl": h,
                          "heldout_max_expert_load_over_mean": max_load})
            tqdm.write(f"step {step + 1}: train loss (last 50) {evals[-1]['train_loss']:.4f}, held-out ppl {h:.2f}, "
                       f"max expert load/mean {max_load:.2f}, epoch {epoch}, {time.time() - t0:.0f}s", file=sys.stdout)
            sys.stdout.flush()
    bar.close()
    wall = time.time() - t0
    tokens = args.steps * args.batch_size * common.SEQ_LEN
    print(f"trained {args.steps} steps ({tokens:,} tokens, {tokens / train_stream.numel():.2f} epochs) "
          f"in {wall:.0f}s: {args.steps / wall:.3f} steps/s, {tokens / wall:.0f} tokens/s", flush=True)
    if args.timing_only:
        return

    recorder.reset()
    total, count = common.heldout_nll(model, held_windows, held_mask)
    model_ppl = common.ppl(total, count)
    held_load = load_stats(recorder)
    recorder.remove()
    uni_ppl = common.unigram_ppl(train_stream, held_windows, held_mask, config.vocab_size)
    metrics = {
        "parameters": n_params,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": common.SEQ_LEN,
        "train_tokens_seen": tokens,
        "train_split_tokens": int(train_stream.numel()),
        "epochs": round(tokens / train_stream.numel(), 3),
        "hyperparameters": {k: v for k, v in vars(args).items() if k not in ("timing_only", "no_export")},
        "threads": common.NUM_THREADS,
        "train_wall_seconds": round(wall, 1),
        "final_train_loss_last50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        "heldout_scored_tokens": count,
        "heldout_token_ppl_fp32": round(model_ppl, 3),
        "heldout_token_ppl_unigram_add1": round(uni_ppl, 3),
        "ppl_ratio_model_over_unigram": round(model_ppl / uni_ppl, 4),
        "heldout_curve": [{k: round(v, 4) if isinstance(v, float) else v for k, v in e.items()} for e in evals],
        "heldout_expert_load": held_load,
        "e_score_correction_bias": {
            f"layer_{i}": [round(float(b), 4) for b in model.model.layers[i].mlp.gate.e_score_correction_bias]
            for i in recorder.counts
        },
    }
    print(json.dumps({k: v for k, v in metrics.items() if k not in ("heldout_expert_load", "e_score_correction_bias")},
                     indent=1), flush=True)
    if model_ppl > uni_ppl / 3:
        raise SystemExit(f"model ppl {model_ppl:.1f} is not <= 1/3 of the unigram ppl {uni_ppl:.1f}")
    common.WORK.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(common.CKPT_FP32),
              metadata={"format": "pt"})
    common.TRAIN_METRICS.write_text(json.dumps(metrics, indent=2))
    print(f"saved {common.CKPT_FP32} and {common.TRAIN_METRICS}", flush=True)
    if not args.no_export:
        import export

        export.main([])


if __name__ == "__main__":
    main()
