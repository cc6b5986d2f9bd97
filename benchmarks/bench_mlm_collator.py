"""Geneformer's MLM masking: Hugging Face's ``DataCollatorForLanguageModeling`` against the
hand-written masking it replaced, and what a resume costs by skipping batches (HF Trainer) against
restoring the stream's position (atlasmix's pretraining loop).

Usage::

    python benchmarks/bench_mlm_collator.py [--batches 40] [--batch-size 12] [--max-len 2048] [--threads 1]
        [--store STORE --mixture MANIFEST [--skip-steps 100]]

Part 1 (CPU, no store): the same token batches (Geneformer V1 style: ``--batch-size`` cells, lengths
drawn between 500 and ``--max-len`` and padded to the batch's longest, ids from the V1 token
dictionary of ``../shared/geneformer`` when present, else 25,426 tokens) are masked by

``hand-written``
    the masking atlasmix used before (uniform draws against 0.15 / 0.8 / 0.9, random replacements
    from the gene tokens only);
``HF, keyed``
    :func:`atlasmix.training.geneformer.pretrain.mask_tokens`: the collator's ``torch_mask_tokens``
    on the padded batch, special-tokens mask from the attention mask, a generator keyed by
    ``(seed, step, rank)``;
``HF, Geneformer's call``
    the collator called as Geneformer's pretrainer calls it: a list of unpadded examples, padded by
    the tokenizer, the special-tokens mask made per token in Python.

Reported per method: milliseconds per batch (median), the fraction of eligible tokens selected,
what the selected tokens became (``<mask>`` / another token / kept), special or padding tokens
selected, random replacements that are special tokens, whether two calls with the same key give the
same masks, and whether torch's global RNG is left as it was.

Part 2 (``--store``): a Geneformer V1 stream (loader + rank value encoding, batch ``--batch-size``,
megabatches of 50 batches) on the mixture's train split: seconds to reach step ``--skip-steps`` by
reading and discarding the batches before it (what HF Trainer's resume does with an
``IterableDataset``: ``accelerate.skip_first_batches``) against restoring the stream's saved
position (``EncodedStream.load_state_dict``: the resume of :mod:`atlasmix.training.pretrain_loop`).

Measured (2026-12-06, the project's shared 2-core CPU machine under load from other jobs; store: a
simulated ``blood_a,blood_b`` corpus of 3,000 cells, ``atlasmix simulate --cells 3000``; ``--store
... --skip-steps 200``)::

    method                   ms/batch  selected  <mask>  other   kept  special sel.  random special  same key same  global RNG kept
    hand-written                 0.42    14.98%   79.9%  10.0%  10.1%             0               0            yes              yes
    HF, keyed                    0.70    14.98%   79.9%  10.1%  10.1%             0               0            yes              yes
    HF, Geneformer's call       18.14    14.98%   79.9%  10.1%  10.1%             0               0            yes              yes

    resume at step 200 of a 250-step epoch (2,844 cells, batch 12):
    how                                                s  ms/step skipped
    skip the trained batches (HF Trainer)           0.62             3.12
    restore the stream position (atlasmix)          0.23

(an earlier run of part 2 on the same store: 1.76 ms per skipped step, 0.04 s to restore). The
collator selects and masks exactly the tokens the hand-written masking did for the same key, costs
0.3 ms more per batch, and is reproducible per ``(seed, step, rank)`` with a keyed generator: the
pretraining uses it. Restoring the position costs one megabatch read whatever the step; skipping
grows with it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GF = ROOT.parent / "shared" / "geneformer"


def handwritten_mask(ids, att, mask_id: int, special_ids: list[int], vocab_size: int, p: float, generator):
    """The masking atlasmix used before the collator (CPU tensors in, CPU tensors out)."""
    import torch

    eligible = att.bool() & ~torch.isin(ids, torch.tensor(special_ids))
    selected = eligible & (torch.rand(ids.shape, generator=generator) < p)
    labels = torch.where(selected, ids, torch.full_like(ids, -100))
    r = torch.rand(ids.shape, generator=generator)
    out = ids.clone()
    out[selected & (r < 0.8)] = mask_id
    rand = torch.randint(max(special_ids) + 1, vocab_size, ids.shape, generator=generator)
    to_rand = selected & (r >= 0.8) & (r < 0.9)
    out[to_rand] = rand[to_rand]
    return out, labels


def token_batches(n: int, batch: int, max_len: int, vocab: int, n_special: int, seed: int = 0):
    """``n`` padded batches: (input_ids int64 (b, L), attention_mask int64 (b, L))."""
    import torch

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(500, max_len + 1, batch)
        L = int(lengths.max())
        ids = np.zeros((batch, L), np.int64)
        for i, k in enumerate(lengths):
            ids[i, :k] = rng.choice(np.arange(n_special, vocab), k, replace=False)
        out.append((torch.from_numpy(ids), torch.from_numpy((ids != 0).astype(np.int64))))
    return out


def part1(args) -> None:
    import torch

    from atlasmix.training.geneformer.dictionaries import Dictionaries, load_dictionaries
    from atlasmix.training.geneformer.pretrain import mask_tokens, mlm_collator
    from atlasmix.training.pretrain_loop import step_generator

    if (GF / "token_dictionary.pkl").is_file():
        dicts, source = load_dictionaries(GF), "Geneformer V1 token dictionary"
    else:
        genes = [f"ENSG{i:011d}" for i in range(25_424)]
        dicts = Dictionaries({"<pad>": 0, "<mask>": 1} | {g: i + 2 for i, g in enumerate(genes)},
                             dict.fromkeys(genes, 1.0))
        source = "synthetic 25,426-token dictionary"
    V, special = dicts.vocab_size(), dicts.special_ids
    collator = mlm_collator(dicts, 0.15)
    batches = token_batches(args.batches, args.batch_size, args.max_len, V, len(special))
    examples = [[{"input_ids": row[row != 0].tolist()} for row in ids] for ids, _ in batches]
    print(f"{len(batches)} batches of {args.batch_size} cells, lengths 500-{args.max_len}, {V:,} tokens "
          f"({source}), torch threads {torch.get_num_threads()}\n")

    def hand(i, g):
        ids, att = batches[i]
        return handwritten_mask(ids, att, dicts.mask_id, special, V, 0.15, g)

    def hf_keyed(i, g):
        return mask_tokens(collator, batches[i][0], batches[i][1], g)

    def hf_call(i, g):
        collator.generator = g
        try:
            b = collator(examples[i])
        finally:
            collator.generator = None
        return b["input_ids"], b["labels"]

    rows = []
    for name, fn in (("hand-written", hand), ("HF, keyed", hf_keyed), ("HF, Geneformer's call", hf_call)):
        for i in range(3):  # warm-up
            fn(i, step_generator(0, i, 0))
        times, sel, elig, to_mask, to_other, special_sel, rand_special = [], 0, 0, 0, 0, 0, 0
        for i, (ids, att) in enumerate(batches):
            g = step_generator(0, i, 0)
            t0 = time.perf_counter()
            out, labels = fn(i, g)
            times.append(time.perf_counter() - t0)
            s = labels != -100
            eligible = att.bool() & ~torch.isin(ids, torch.tensor(special))
            sel += int(s.sum())
            elig += int(eligible.sum())
            special_sel += int((s & ~eligible).sum())
            to_mask += int((out[s] == dicts.mask_id).sum())
            other = s & (out != ids) & (out != dicts.mask_id)
            to_other += int(other.sum())
            rand_special += int(torch.isin(out[other], torch.tensor(special)).sum())
        rng_before = torch.get_rng_state()
        a, b = fn(0, step_generator(7, 3, 1)), fn(0, step_generator(7, 3, 1))
        same = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
        untouched = bool(torch.equal(rng_before, torch.get_rng_state()))
        rows.append((name, 1e3 * float(np.median(times)), sel / elig, to_mask / sel, to_other / sel,
                     1 - (to_mask + to_other) / sel, special_sel, rand_special, same, untouched))
    print(f"{'method':<24}{'ms/batch':>9}{'selected':>10}{'<mask>':>8}{'other':>7}{'kept':>7}"
          f"{'special sel.':>14}{'random special':>16}{'same key same':>15}{'global RNG kept':>17}")
    for r in rows:
        print(f"{r[0]:<24}{r[1]:>9.2f}{r[2]:>10.2%}{r[3]:>8.1%}{r[4]:>7.1%}{r[5]:>7.1%}{r[6]:>14}{r[7]:>16}"
              f"{'yes' if r[8] else 'no':>15}{'yes' if r[9] else 'no':>17}")


def part2(args) -> None:
    from atlasmix.store import Store
    from atlasmix.training.geneformer.dictionaries import build_dictionaries, load_dictionaries
    from atlasmix.training.geneformer.tokenizer import GeneformerStream, vocabulary_axis
    from atlasmix.training.loader import MixtureLoader

    store = Store(args.store)
    if (GF / "token_dictionary.pkl").is_file():
        dicts = load_dictionaries(GF)
    else:
        dicts = build_dictionaries(dict.fromkeys(store.var()["feature_id"].astype(str), 1.0))
    axis = vocabulary_axis(store, dicts)

    def stream():
        loader = MixtureLoader(store, args.mixture, "train", var_joinids=axis["var_joinids"],
                               batch_size=args.batch_size * 50, io_batch_size=args.batch_size * 50, seed=0,
                               obs_columns=("dataset_id",), library="total_counts", sparse=True)
        return GeneformerStream(loader, axis, dicts, mode="v1", batch_size=args.batch_size)

    s = stream()
    n = min(args.skip_steps, len(s) - 1)
    it = iter(s)
    t0 = time.perf_counter()  # both timings start with an opened store (first read included)
    for _ in range(n):  # HF Trainer: the n batches read and dropped, then step n + 1's
        next(it)
    skip = time.perf_counter() - t0
    state = s.state_dict()
    r = stream()
    t0 = time.perf_counter()
    r.load_state_dict(state)
    next(iter(r))
    restore = time.perf_counter() - t0
    print(f"\nresume at step {n} of a {len(s)}-step epoch ({s.loader.n_obs:,} cells, batch {args.batch_size}):")
    print(f"{'how':<44}{'s':>8}{'ms/step skipped':>17}")
    print(f"{'skip the trained batches (HF Trainer)':<44}{skip:>8.2f}{1e3 * skip / n:>17.2f}")
    print(f"{'restore the stream position (atlasmix)':<44}{restore:>8.2f}{'':>17}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--store")
    ap.add_argument("--mixture")
    ap.add_argument("--skip-steps", type=int, default=100)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    part1(args)
    if args.store:
        part2(args)


if __name__ == "__main__":
    main()
