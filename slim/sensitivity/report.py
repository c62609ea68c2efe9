"""sensitivity.md: the ranking, the search and the paste-ready override as markdown."""

from __future__ import annotations


def to_markdown(r: dict) -> str:
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    cal, held, local = r["calibration"], r["heldout"], r["method"] == "layer_local"
    title = f"## Sensitivity: {r['model']}, {r['scheme']}" + (f" (group {r['group_size']})" if r["group_size"] else "")
    if local:
        lines = [title + " - LAYER-LOCAL (streamed)", "", "Each group quantized alone, scored by the error it adds to "
                 "its own layer's output relative to that layer's update (lm_head: to the logits), not by the model's "
                 f"loss; calibration {cal['num_samples']} x {cal['seq_len']} tokens. No held-out search was run (it needs "
                 f"the whole model in memory). Ranked by {r['rank_by']}.", "",
                 "| rank | group | pattern | modules | params | MiB kept -> quantized | rel. output error |",
                 "|---:|---|---|---:|---:|---:|---:|"]
    else:
        lines = [title, "", f"Each group quantized alone; calibration {cal['num_samples']} x {cal['seq_len']} tokens, "
                 f"unquantized mean token NLL {cal['baseline_nll']:.5f}. Ranked by {r['rank_by']}.", "",
                 "| rank | group | pattern | modules | params | MiB kept -> quantized | NLL | delta NLL ± s.e. |",
                 "|---:|---|---|---:|---:|---:|---:|---:|"]
    for g in r["ranking"]:
        se = "" if g["delta_se"] is None else f" ± {g['delta_se']:.5f}"
        score = f"{g['delta']:.3e}" if local else f"{g['loss']:.5f} | {g['delta']:+.5f}{se}"
        lines.append(f"| {g['rank']} | {g['group']} | `{g['pattern']}` | {g['modules']} | {g['params']:,} | "
                     f"{mb(g['kept_bytes'])} -> {mb(g['quantized_bytes'])} | {score} |")
    if r["not_candidates"]:
        lines += ["", "Never quantized here: " + ", ".join(f"{g['group']} ({g['note']})" for g in r["not_candidates"])]
    b = r["bytes"]
    size = (f"Checkpoint about {mb(b['checkpoint'])} MiB (unquantized {mb(b['unquantized_checkpoint'])} MiB): quantized "
            f"modules {mb(b['quantized_modules'])} MiB, unquantized modules {mb(b['kept_modules'])} MiB, other tensors "
            f"{mb(b['other'])} MiB.")
    if local:
        return "\n".join(lines + ["", f"Suggested list: the top {r['kept_top']} group(s) kept unquantized "
                                  "(sensitivity.max_groups), the rest quantized. " + size, "", "    " + r["override"]])
    lines += ["", f"Greedy search on {held['metric']} (unquantized {held['baseline']:.4f}, target "
              f"{100 * held['target_delta']:+.2f}%):", "",
              "| step | groups kept unquantized | metric | vs unquantized | checkpoint MiB |", "|---|---|---:|---:|---:|"]
    for i, st in enumerate(r["steps"]):
        kept = ", ".join(st["kept"]) or "none (every candidate quantized)"
        mark = " **(chosen)**" if i == r["chosen_step"] else ""
        lines.append(f"| {i} {st['phase']}{mark} | {kept} | {st['metric']:.4f} | {100 * st['rel_delta']:+.3f}% | "
                     f"{mb(st['checkpoint_bytes'])} |")
    ref = r["reference"]
    if ref:
        lines.append(f"| reference | scheme.ignore_layers={ref['ignore_layers']} | {ref['metric']:.4f} | "
                     f"{100 * ref['rel_delta']:+.3f}% | {mb(ref['checkpoint_bytes'])} |")
    lines += ["", ("Target met" if held["target_met"] else "Target NOT met (sensitivity.max_groups reached)")
              + f": {held['metric']} {held['final']:.4f} ({100 * held['rel_delta']:+.3f}%). " + size, "",
              "    " + r["override"]]
    return "\n".join(lines)
