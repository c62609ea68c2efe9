"""Build the text, tokenizer and shipped data of slim's embedded tiny DeepSeek-V3 model.

Source: the English Wikipedia XML extract that gensim 4.4.0 ships as test data in its wheel
(CC BY-SA 3.0 / GFDL, Wikipedia contributors). It is fetched with ``pip download`` and read out of the
wheel without installing gensim, its sha256 checked, its articles (namespace 0, no redirects) stripped
of wiki markup with mwparserfromhell, and split deterministically BY ARTICLE into train (~95%) and
held-out (~5%).

Writes:
  experiments/tiny_model/work/{train,heldout}.jsonl   one {"title", "text"} record per article (git-ignored)
  experiments/tiny_model/work/tokenizer/              byte-level BPE, vocab 4096, trained on train only
  slim/assets/data/calibration.jsonl                  {"text"} train paragraphs
  slim/assets/data/heldout_ppl.jsonl                  {"text"} held-out documents (rolling perplexity)
  slim/assets/data/heldout_mc.jsonl                   {"context", "choices", "label"} held-out continuations
  slim/assets/data/README.md                          provenance, license, recipe, split sizes

Usage:  pip install mwparserfromhell && python experiments/tiny_model/prepare_data.py
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import mwparserfromhell

ROOT = Path(__file__).resolve().parents[2]
WORK = Path(__file__).resolve().parent / "work"
DATA_OUT = ROOT / "slim" / "assets" / "data"

GENSIM_SPEC = "gensim==4.4.0"
MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
MEMBER_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
XML_NS = "{http://www.mediawiki.org/xml/export-0.10/}"

HELDOUT_FRACTION = 0.05
SEED = 1234
VOCAB_SIZE = 4096
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"  # DeepSeek-V3/R1's special tokens

# Sections that are lists of links/citations rather than prose; the article is cut at the first one.
END_SECTIONS = {
    "see also", "references", "external links", "notes", "further reading", "bibliography",
    "sources", "citations", "footnotes", "notes and references", "works cited", "works",
    "selected works", "publications", "discography", "filmography", "gallery",
}
DROP_TAGS = {"ref", "table", "gallery", "math", "chem", "timeline", "imagemap", "score", "syntaxhighlight",
             "source", "pre", "code", "hiero", "references", "div", "blockquote", "sup", "sub"}
DROP_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikt:", "s:", "commons:")
INTERWIKI = re.compile(r"^[a-z]{2,3}(-[a-z]+)?:")


# ----------------------------------------------------------------------------------------------------
# Source
# ----------------------------------------------------------------------------------------------------
def fetch_dump(wheel_dir: Path | None) -> bytes:
    """The bz2 member of the gensim wheel (downloaded with pip unless a wheel dir is given), sha-checked."""
    with tempfile.TemporaryDirectory() as tmp:
        wdir = Path(wheel_dir) if wheel_dir else Path(tmp)
        if not list(wdir.glob("gensim-4.4.0-*.whl")):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", GENSIM_SPEC,
                            "-d", str(wdir)], check=True)
        wheel = sorted(wdir.glob("gensim-4.4.0-*.whl"))[0]
        with zipfile.ZipFile(wheel) as zf:
            raw = zf.read(MEMBER)
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MEMBER_SHA256:
        raise SystemExit(f"sha256 of {MEMBER} is {digest}, expected {MEMBER_SHA256}")
    return raw


def iter_articles(xml_bytes: bytes):
    """(title, wikitext) for every namespace-0 page that is not a redirect, in file order."""
    for _, el in ET.iterparse(io.BytesIO(xml_bytes)):
        if el.tag != XML_NS + "page":
            continue
        title = el.findtext(XML_NS + "title")
        ns = el.findtext(XML_NS + "ns")
        redirect = el.find(XML_NS + "redirect") is not None
        text = el.findtext(f"{XML_NS}revision/{XML_NS}text") or ""
        el.clear()
        if ns == "0" and not redirect and not text.lstrip().lower().startswith("#redirect"):
            yield title, text


# ----------------------------------------------------------------------------------------------------
# Wiki markup -> prose paragraphs
# ----------------------------------------------------------------------------------------------------
def _clean_line(s: str) -> str:
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"\(\s*[,;:]*\s*\)", "", s)            # brackets emptied by removed templates
    s = re.sub(r"\(\s*[,;:]\s*", "(", s)
    s = re.sub(r"\s*[,;:]\s*\)", ")", s)
    s = re.sub(r"\s+([,.;:!?)])", r"\1", s)
    s = re.sub(r"([(])\s+", r"\1", s)
    s = re.sub(r",{2,}", ",", s)
    s = re.sub(r"\s{2,}", " ", s)
    return s.strip()


def _is_prose(p: str) -> bool:
    if len(p) < 120 or not p[-1] in ".!?\"'”":
        return False
    if p[0] in "*#:;|{}!=<[" or "|" in p or "{{" in p or "}}" in p or "[[" in p or "<" in p:
        return False
    letters = sum(c.isalpha() for c in p)
    return letters / len(p) > 0.7 and p.count(" ") >= 15


def wiki_to_paragraphs(wikitext: str) -> list[str]:
    code = mwparserfromhell.parse(wikitext)
    # cut at the first list-like end section (See also, References, ...)
    for heading in code.filter_headings(recursive=False):
        if heading.title.strip_code().strip().lower() in END_SECTIONS:
            idx = code.index(heading)
            code = mwparserfromhell.parse("".join(str(n) for n in code.nodes[:idx]))
            break
    for tpl in code.filter_templates(recursive=False):
        _safe_remove(code, tpl)
    for tag in code.filter_tags(recursive=True):
        if str(tag.tag).strip().lower() in DROP_TAGS:
            _safe_remove(code, tag)
    for link in code.filter_wikilinks(recursive=True):
        target = str(link.title).strip().lower()
        if target.startswith(DROP_LINK_PREFIXES) or INTERWIKI.match(target):
            _safe_remove(code, link)
    for heading in code.filter_headings(recursive=True):  # some sit inside unclosed tags
        _safe_remove(code, heading)
    text = code.strip_code(normalize=True, collapse=True, keep_template_params=False)
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln for ln in block.split("\n") if ln.strip() and ln.lstrip()[0] not in "*#:;|{}!="]
        p = _clean_line(" ".join(lines))
        if _is_prose(p):
            paragraphs.append(p)
    return paragraphs


def _safe_remove(code, node) -> None:
    try:
        code.remove(node)
    except ValueError:  # already gone with a removed parent
        pass


# ----------------------------------------------------------------------------------------------------
# Split, tokenizer, shipped data
# ----------------------------------------------------------------------------------------------------
def split_by_article(articles: list[dict]) -> tuple[list[dict], list[dict]]:
    """Articles in sha256(title) order; held-out takes them until it holds ~5% of all characters."""
    order = sorted(articles, key=lambda a: hashlib.sha256(a["title"].encode()).hexdigest())
    total = sum(len(a["text"]) for a in articles)
    heldout, held_chars = [], 0
    for a in order:
        if held_chars >= HELDOUT_FRACTION * total:
            break
        if len(a["text"]) > 2.5 * HELDOUT_FRACTION * total:  # one huge article must not be the whole split
            continue
        heldout.append(a)
        held_chars += len(a["text"])
    held_titles = {a["title"] for a in heldout}
    train = [a for a in articles if a["title"] not in held_titles]
    heldout = [a for a in articles if a["title"] in held_titles]  # file order, like train
    return train, heldout


def train_tokenizer(train: list[dict], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, min_frequency=2, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator((a["text"] for a in train), trainer=trainer, length=len(train))
    bos_id = tok.token_to_id(BOS)
    # like DeepSeek-V3/R1: a BOS is prepended, no EOS appended
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        model_max_length=1024, clean_up_tokenization_spaces=False,
    )
    fast.add_bos_token = True
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")


def _sentences(p: str) -> list[str]:
    return [s for s in _SENT_SPLIT.split(p) if s]


def _truncate_words(s: str, limit: int) -> str:
    if len(s) <= limit:
        return s
    cut = s[:limit].rsplit(" ", 1)[0]
    return cut if len(cut) >= limit // 2 else s[:limit]


def make_calibration(train: list[dict], rng: random.Random, budget_chars: int = 450_000) -> list[dict]:
    paras = [p for a in train for p in a["text"].split("\n\n") if 300 <= len(p) <= 3000]
    rng.shuffle(paras)
    out, size = [], 0
    for p in paras:
        if size >= budget_chars:
            break
        out.append({"text": p})
        size += len(p)
    return out


def make_ppl_docs(heldout: list[dict], n_docs: int = 24, lo: int = 1000, hi: int = 3000) -> list[dict]:
    """Consecutive whole paragraphs of held-out articles, 1,000-3,000 chars, taken round-robin over articles."""
    per_article = []
    for a in heldout:
        docs, cur = [], []
        for p in a["text"].split("\n\n"):
            if len(p) > hi:
                continue
            if sum(map(len, cur)) + len(p) + 2 * len(cur) > hi:
                if sum(map(len, cur)) >= lo:
                    docs.append("\n\n".join(cur))
                cur = []
            cur.append(p)
            if sum(map(len, cur)) + 2 * (len(cur) - 1) >= lo:
                docs.append("\n\n".join(cur))
                cur = []
        per_article.append(docs)
    out, i = [], 0
    while len(out) < n_docs and any(i < len(d) for d in per_article):
        for docs in per_article:
            if i < len(docs) and len(out) < n_docs:
                out.append({"text": docs[i]})
        i += 1
    return out


def make_mc_items(heldout: list[dict], train_tokens_counts, tokenizer, rng: random.Random,
                  n_items: int = 200, lo: int = 100, hi: int = 500, cont_chars: int = 100, k_near: int = 8) -> list[dict]:
    """Next-text multiple choice from held-out paragraphs.

    Each paragraph is cut once at a random word boundary 100-500 chars in: context = the text before the
    cut, right answer = the next ~100 chars (cut at a word boundary). Distractors are the continuations of
    passages from OTHER held-out articles, chosen at random among the ``k_near`` whose add-one unigram
    log-probability (train-split token counts) is closest to the right answer's, so that a model that ignores
    the context cannot tell them apart by how common their words are. Label position shuffled.
    """
    import math

    total = sum(train_tokens_counts) + len(train_tokens_counts)
    logp = [math.log((c + 1) / total) for c in train_tokens_counts]

    def unigram_logprob(text: str) -> float:
        return sum(logp[i] for i in tokenizer(" " + text, add_special_tokens=False)["input_ids"])

    cands = []  # (article index, context, continuation)
    for ai, a in enumerate(heldout):
        for p in a["text"].split("\n\n"):
            if len(p) < lo + cont_chars + 20:
                continue
            cut = p.rfind(" ", 0, rng.randint(lo, min(hi, len(p) - cont_chars - 10)))
            cands.append((ai, p[:cut].strip(), _truncate_words(p[cut + 1 :].strip(), cont_chars)))
    rng.shuffle(cands)
    scores = [unigram_logprob(c[2]) for c in cands]
    out = []
    for idx, (ai, context, cont) in enumerate(cands[:n_items]):
        others = [j for j, c in enumerate(cands) if c[0] != ai and c[2] != cont]
        near = sorted(others, key=lambda j: (abs(scores[j] - scores[idx]), j))[:k_near]
        choices = [cands[j][2] for j in rng.sample(near, 3)] + [cont]
        rng.shuffle(choices)
        out.append({"context": context, "choices": choices, "label": choices.index(cont)})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_data_readme(stats: dict) -> None:
    s = stats
    held = ", ".join(f'"{t}"' for t in s["heldout_titles"])
    text = f"""# Shipped text data of slim's embedded model

## Source
English Wikipedia articles from the XML dump extract that gensim 4.4.0 ships as test data inside its wheel:

- package: `{GENSIM_SPEC}` (PyPI), fetched with `pip download --no-deps {GENSIM_SPEC}`
- wheel member: `{MEMBER}`
- sha256 of that bz2 member: `{MEMBER_SHA256}`

## License
The text is from Wikipedia, written by Wikipedia contributors, and is licensed under the
[Creative Commons Attribution-ShareAlike 3.0 Unported License](https://creativecommons.org/licenses/by-sa/3.0/)
(CC BY-SA 3.0; also available under the GFDL). These files are adapted (markup stripped, split, excerpted)
and are distributed under the same license. Attribution: Wikipedia contributors, articles
{held} (held-out) and {s["n_train_articles"]} others (train),
revision history at https://en.wikipedia.org/.

## How it was made
`python experiments/tiny_model/prepare_data.py` (needs `mwparserfromhell`, the `train` extra):

1. Pages of namespace 0 that are not redirects ({s["n_articles"]} articles).
2. Wiki markup stripped with mwparserfromhell: templates, tables, refs, math, files/images, category
   and interlanguage links and headings removed; each article cut at its first "See also"/"References"/
   "External links"/... section; `strip_code()`; whitespace normalised; only prose paragraphs kept
   (>= 120 chars, ending in sentence punctuation, mostly letters).
3. Split BY ARTICLE: articles ordered by sha256(title); the held-out split takes them in that order until it
   holds {HELDOUT_FRACTION:.0%} of the characters (skipping any single article larger than 2.5x that share).
   Train: {s["n_train_articles"]} articles, {s["train_chars"]:,} chars; held-out: {s["n_heldout_articles"]} articles,
   {s["heldout_chars"]:,} chars.
4. Shipped files (seed {SEED}):
   - `calibration.jsonl` ({s["n_calib"]} records, {s["calib_chars"]:,} chars): `{{"text"}}` random train paragraphs (300-3,000 chars).
   - `heldout_ppl.jsonl` ({s["n_ppl"]} records, {s["ppl_chars"]:,} chars): `{{"text"}}` consecutive whole paragraphs of held-out
     articles, 1,000-3,000 chars each, round-robin over the held-out articles (for `loglikelihood_rolling`).
   - `heldout_mc.jsonl` ({s["n_mc"]} items): `{{"context", "choices", "label"}}`; each held-out paragraph is cut
     once at a random word boundary 100-500 chars in (one item per paragraph): context = the text before the
     cut, right choice = the next ~100 chars (cut at a word boundary), 3 distractors = continuations of passages
     from OTHER held-out articles, drawn among the 8 whose add-one unigram log-probability (train-split token
     counts, shipped tokenizer) is closest to the right choice's, so word frequency alone does not give the
     answer away; label position shuffled. Chance accuracy is 0.25.

The tokenizer and model of `slim/assets/tiny_deepseek` are trained on the train split only.
"""
    (DATA_OUT / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel-dir", type=Path, default=None, help="directory already holding the gensim wheel")
    args = ap.parse_args()

    from transformers import PreTrainedTokenizerFast

    raw = fetch_dump(args.wheel_dir)
    xml_bytes = bz2.decompress(raw)
    articles = []
    for title, wikitext in iter_articles(xml_bytes):
        paras = wiki_to_paragraphs(wikitext)
        if paras:
            articles.append({"title": title, "text": "\n\n".join(paras)})
    train, heldout = split_by_article(articles)
    print(f"articles {len(articles)}: train {len(train)}, held-out {len(heldout)} "
          f"({[a['title'] for a in heldout]})")

    write_jsonl(WORK / "train.jsonl", train)
    write_jsonl(WORK / "heldout.jsonl", heldout)
    train_tokenizer(train, WORK / "tokenizer")

    calib = make_calibration(train, random.Random(SEED))
    ppl_docs = make_ppl_docs(heldout)
    tok = PreTrainedTokenizerFast.from_pretrained(str(WORK / "tokenizer"))
    counts = [0] * len(tok)
    for a in train:
        for i in tok(a["text"], add_special_tokens=False)["input_ids"]:
            counts[i] += 1
    mc = make_mc_items(heldout, counts, tok, random.Random(SEED + 1))
    write_jsonl(DATA_OUT / "calibration.jsonl", calib)
    write_jsonl(DATA_OUT / "heldout_ppl.jsonl", ppl_docs)
    write_jsonl(DATA_OUT / "heldout_mc.jsonl", mc)
    stats = {
        "n_articles": len(articles), "n_train_articles": len(train), "n_heldout_articles": len(heldout),
        "heldout_titles": [a["title"] for a in heldout],
        "train_chars": sum(len(a["text"]) for a in train), "heldout_chars": sum(len(a["text"]) for a in heldout),
        "n_calib": len(calib), "calib_chars": sum(len(r["text"]) for r in calib),
        "n_ppl": len(ppl_docs), "ppl_chars": sum(len(r["text"]) for r in ppl_docs), "n_mc": len(mc),
    }
    write_data_readme(stats)
    (WORK / "data_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
