"""The ``streamed`` evaluation backend: lm-eval requests scored one decoder layer at a time.

Every request of a task is tokenized and batched first, exactly as lm-eval's HFLM does (same encoding, same sort
order, same batches, same right padding), then all batches walk through the model together: the embedding, then
decoder layer 0 for every batch, layer 1 for every batch, ..., then the final norm, the head and the log-softmax
(fp32) per batch. Only one layer's weights are resident (slim.models.streaming reads them from the checkpoint
being scored, quantized Linears as the serving engine computes them); the batches' hidden states wait on the
device, in host memory or in a memory-mapped file (slim.hidden_store). So a 671B model is scored on one GPU or
one CPU host, and the scores equal those of the hf backend on a model that fits it. On N ranks, rank 0 runs lm-eval
and each rank scores about 1/N of the batches (slim.eval_ranks): the same scores, 1/N of the hidden states each.

Only log-likelihood requests (``loglikelihood``, ``loglikelihood_rolling``) can be answered this way; tasks that
generate text need the whole model per token and go to ``eval.backend=vllm``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, _add_special_kwargs, has_bos_prefix, resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm
from transformers.masking_utils import create_causal_mask

from slim.config import EvalConfig
from slim.distributed import Dist
from slim.errors import SlimError
from slim.eval_ranks import RankScorer, checkpoint_open, serve
from slim.eval_tasks import run_tasks
from slim.hidden_store import HiddenStore, choose_store, host_available_bytes
from slim.models.streaming import CheckpointParts

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 2048  # lm-eval's HFLM default when neither config nor tokenizer names one


@dataclass
class Batch:
    """One lm-eval batch: its requests (as the Collator yields them), right-padded ids and input lengths."""

    chunk: list
    input_ids: torch.Tensor  # [b, T] long
    inplens: list[int]
    cont_toks: list[list[int]]


@dataclass
class Group:
    """The requests HFLM scores in one ``_loglikelihood_tokens`` call, reordered by their Collator."""

    collator: Collator
    batches: list[Batch] = field(default_factory=list)


@dataclass
class Job:
    """One batch as any rank scores it: right-padded ids [b, T], each row's input length and continuation length,
    and the continuations scored against the row's log-probs (several where lm-eval's cache groups requests that
    share all but their last token, one otherwise). Token ids only: cheap to send to another rank."""

    input_ids: torch.Tensor
    inplens: list[int]
    contlens: list[int]
    conts: list[list[list[int]]]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()

    @property
    def requests(self) -> int:
        return sum(len(c) for c in self.conts)


_NO_LOGITS = torch.empty(1, 1, 1)  # what the Collator's cache lookup expands; its values are never read


def _collate(req):  # HFLM's sort key: longest first, then by tokens
    toks = req[1] + req[2]
    return -len(toks), tuple(toks)


def _lookup_one_token_cont(req):  # HFLM's key for requests that share all but the last continuation token
    return req[-2] + req[-1][:-1]


class LayerScorer:
    """Scores :class:`Job` s in this process: every job through the embedding and each decoder layer in turn
    (one layer's weights resident), then the final norm, the head and the log-softmax (fp32) per job. The jobs'
    hidden states wait where :func:`slim.hidden_store.choose_store` puts them."""

    def __init__(self, parts: CheckpointParts, store: str = "auto", spill_dir: Path | None = None,
                 device_bytes: int = 0, host_bytes: int = 0, desc: str = "streamed eval"):
        self.parts, self.device, self.desc = parts, parts.device, desc
        self.store, self.spill_dir, self.device_bytes, self.host_bytes = store, spill_dir, device_bytes, host_bytes
        self.stats: list[dict] = []  # per streamed pass: requests, tokens, store, seconds

    def __call__(self, jobs: list[Job]) -> list[list[tuple[float, bool]]]:
        return self.score_jobs(jobs)

    def score_jobs(self, jobs: list[Job]) -> list[list[tuple[float, bool]]]:
        """Score ``jobs`` in this process: all of them through every layer, then the head per job."""
        if not jobs:
            return []
        hidden = self._run_layers(jobs)
        out = []
        try:
            with self.parts.part(self.parts.model.model.norm, "model.norm.") as norm, \
                    self.parts.part(self.parts.model.lm_head, "lm_head.") as head:
                for i, job in enumerate(jobs):
                    out.append(_answers(job, F.log_softmax(head(norm(hidden.get(i))), dim=-1, dtype=torch.float32)))
        finally:
            hidden.close()
        return out

    def _layer_kwargs(self, h: torch.Tensor) -> dict:
        b, t, _ = h.shape
        position_ids = torch.arange(t, device=self.device).unsqueeze(0).expand(b, -1)
        return {
            "position_embeddings": self.parts.model.model.rotary_emb(h, position_ids),
            "attention_mask": create_causal_mask(config=self.parts.config, inputs_embeds=h, attention_mask=None,
                                                 cache=None, position_ids=position_ids),
            "position_ids": position_ids,
        }

    @torch.no_grad()
    def _run_layers(self, batches: list[Job]) -> HiddenStore:
        parts, hidden_size = self.parts, self.parts.config.hidden_size
        shapes = [(b.input_ids.shape[0], b.input_ids.shape[1], hidden_size) for b in batches]
        tokens = sum(b * t for b, t, _ in shapes)
        nbytes = tokens * hidden_size * parts.dtype.itemsize
        where = choose_store(self.store, nbytes, self.device, self.device_bytes,
                             self.host_bytes or host_available_bytes())
        store = HiddenStore(shapes, parts.dtype, where, self.device, self.spill_dir)
        start = time.perf_counter()
        parts.rotary_to(self.device)
        with parts.part(parts.model.model.embed_tokens, "model.embed_tokens.") as embed:
            for i, b in enumerate(batches):
                store.put(i, embed(b.input_ids.to(self.device)))
        layers = parts.layers()
        requests = sum(b.requests for b in batches)
        bar = tqdm(range(len(layers)), desc=self.desc, unit="layer", leave=False,
                   postfix={"requests": requests, "tokens": tokens, "hidden": where})
        for index in bar:
            with parts.part(layers[index], parts.layer_prefix(index)) as layer:
                for i in range(len(batches)):
                    h = store.get(i)
                    out = layer(h, **self._layer_kwargs(h))
                    store.put(i, out[0] if isinstance(out, tuple) else out)
        bar.close()
        self.stats.append({"requests": requests, "batches": len(batches),
                           "tokens": tokens, "hidden_bytes": nbytes, "hidden_states_on": where,
                           "seconds": round(time.perf_counter() - start, 3)})
        log.info("%s: %d batches (%d tokens, largest batch %d) through %d layers, hidden states on %s (%.1f MiB)",
                 self.desc, len(batches), tokens, max(b * t for b, t, _ in shapes), len(layers), where, nbytes / 2**20)
        return store


class StreamedLM(TemplateLM):
    """An lm-eval ``LM`` (see module docstring): it tokenizes and batches as HFLM does and hands the batches, as
    :class:`Job` s, to ``scorer`` (a :class:`LayerScorer`, or :class:`slim.eval_ranks.RankScorer` over N ranks)."""

    def __init__(self, config, tokenizer, batch_size: int, scorer: Callable[[list[Job]], list]):
        super().__init__()
        self.tokenizer, self.batch_size, self.scorer = tokenizer, int(batch_size), scorer
        self.add_bos_token = None  # the tokenizer's own default, as HFLM without add_bos_token
        self._max_length = resolve_max_length(config, tokenizer, default=DEFAULT_MAX_LENGTH)

    # --- tokenization: HFLM's, so both backends score the same tokens ---
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        enc = self.tokenizer.encode(string, **special)
        return enc[-left_truncate_len:] if left_truncate_len else enc

    # --- lm-eval's request types ---
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        return self._score([requests])[0]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, counts = [], []
        for (string,) in [req.args for req in requests]:
            rolling = list(map(make_disjoint_window, get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)))
            windows.extend((None,) + w for w in rolling)
            counts.append(len(rolling))
        # HFLM scores the windows batch_size at a time, each slice one _loglikelihood_tokens call: the same here
        groups = [windows[i:i + self.batch_size] for i in range(0, len(windows), self.batch_size)]
        flat = [r for part in self._score(groups) for r in part]
        out, pos = [], 0
        for n in counts:
            out.append(sum(ll for ll, _ in flat[pos:pos + n]))
            pos += n
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise SlimError("eval.backend=streamed answers log-likelihood tasks only (multiple choice, perplexity); "
                        "a task that generates text needs eval.backend=vllm (or hf for a model that fits)")

    # --- the streamed pass ---
    def _batches(self, requests) -> Group:
        group = Group(Collator(requests, sort_fn=_collate, group_by="contexts", group_fn=_lookup_one_token_cont))
        for chunk in group.collator.get_batched(n=self.batch_size):
            inps, inplens, conts = [], [], []
            for _, context_enc, continuation_enc in chunk:
                inp = (context_enc + continuation_enc)[-(self.max_length + 1):][:-1]
                inps.append(torch.tensor(inp, dtype=torch.long))
                inplens.append(len(inp))
                conts.append(continuation_enc)
            width = max(inplens)
            ids = torch.zeros(len(inps), width, dtype=torch.long)  # right padding with 0, as pad_and_concat
            for row, inp in enumerate(inps):
                ids[row, : len(inp)] = inp
            group.batches.append(Batch(list(chunk), ids, inplens, conts))
        return group

    def _job(self, collator: Collator, b: Batch) -> Job:
        """The batch's rows and the continuations scored against each: the Collator's cache lookup, in HFLM's
        order (it records the order in which ``get_original`` puts the answers back; it never reads logits)."""
        conts = [[cont for _, cont, _ in collator.get_cache(req_str=request_str, cxt_toks=ctx_tokens,
                                                            cont_toks=cont_toks, logits=_NO_LOGITS)]
                 for (request_str, ctx_tokens, _), cont_toks in zip(b.chunk, b.cont_toks)]
        return Job(b.input_ids, b.inplens, [len(c) for c in b.cont_toks], conts)

    def _score(self, request_groups: list[list]) -> list[list[tuple[float, bool]]]:
        groups = [self._batches(reqs) for reqs in request_groups]
        jobs = [self._job(g.collator, b) for g in groups for b in g.batches]
        answers = iter(self.scorer(jobs) if jobs else [])
        results = []
        for g in groups:
            res = [a for _ in g.batches for a in next(answers)]
            results.append(g.collator.get_original(res))
        return results

def _answers(job: Job, logprobs: torch.Tensor) -> list[tuple[float, bool]]:
    """HFLM's scoring of one batch's log-probs [b, T, V]: each row's continuation slice, its greedy check, and
    every continuation the Collator's cache attached to the row."""
    out = []
    for row, (inplen, contlen, conts) in enumerate(zip(job.inplens, job.contlens, job.conts)):
        logits = logprobs[row, inplen - contlen: inplen].unsqueeze(0)  # [1, contlen, V]
        greedy = logits.argmax(dim=-1)
        for cont in conts:
            cont = torch.tensor(cont, dtype=torch.long, device=logits.device).unsqueeze(0)
            max_equal = bool((greedy[:, -cont.shape[1]:] == cont).all())
            out.append((float(torch.gather(logits, 2, cont.unsqueeze(-1)).squeeze(-1).sum()), max_equal))
    return out


def evaluate_streamed(path: Path, cfg: EvalConfig, workdir: Path, *, tokenizer, model,
                      dist: Dist | None = None) -> dict[str, dict[str, float]]:
    """Score the checkpoint at ``path`` on ``cfg.tasks`` with the streamed backend; ``model``: ModelSettings.
    With several ranks (``dist``), this is rank 0: the others, in :func:`serve_streamed_eval`, score their share
    of each pass's batches."""
    dist = dist or Dist()
    request = {"path": str(path), "model": dataclasses.asdict(model), "hidden_states": cfg.hidden_states,
               "spill_dir": str(Path(cfg.spill_dir) if cfg.spill_dir else Path(workdir) / "eval_spill")}
    local = open_scorer(request, model.device, dist)
    scorer = RankScorer(dist, local, cost=lambda job: job.tokens) if dist.world > 1 else local
    lm = StreamedLM(local.parts.config, tokenizer, cfg.batch_size, scorer)
    with checkpoint_open(dist, request):
        return run_tasks(lm, cfg, workdir)


def open_scorer(request: dict, device: str, dist: Dist) -> LayerScorer:
    """This rank's :class:`LayerScorer` of the checkpoint ``request`` names (see :func:`evaluate_streamed`)."""
    m = request["model"]
    parts = CheckpointParts(request["path"], load_type=m["load_type"], dtype=m["dtype"], device=device,
                            trust_remote_code=m["trust_remote_code"], numerics=m["numerics"])
    return LayerScorer(parts, store=request["hidden_states"], spill_dir=Path(request["spill_dir"]),
                       device_bytes=int(m["device_memory_gb"] * 2**30), host_bytes=int(m["host_memory_gb"] * 2**30),
                       desc="streamed eval" + (f" (rank {dist.rank}/{dist.world})" if dist.world > 1 else ""))


def serve_streamed_eval(dist: Dist) -> None:
    """Ranks other than 0: score the batches rank 0 hands out until it is done (:func:`slim.eval_ranks.serve`)."""
    serve(dist, lambda request: open_scorer(request, str(dist.device), dist))
