"""Load balance of packed documents: zigzag over the packed row vs per-document head-tail splits.

A packed row holds several documents back to back; attention stays inside each document
(causal), so a query at position ``p`` of its document sees ``p + 1`` keys: that is its work.
Two ways to give each CP rank its tokens:

* **zigzag over the row** (what ``load_balance="zigzag"`` does today): the row is cut into
  ``2*cp`` equal chunks and rank ``r`` holds chunks ``r`` and ``2*cp-1-r``, ignoring documents.
* **per_document** (``load_balance="per_document"``, the layout nxd_cp ships, measured on the
  library's own ``nxd_cp.sequence.layout.document_index``): every document is cut into ``2*cp``
  contiguous pieces without padding (sizes differ by one token, the extra tokens dealt
  round-robin over the row) and rank ``i`` holds pieces ``i`` and ``2*cp-1-i`` of every
  document.
* **padded head-tail** (TransformerEngine's THD + CP, PyTorch's per-document balancer): every
  document is padded to a multiple of ``2*cp`` and cut into ``2*cp`` equal pieces, same
  assignment, at the price of padding tokens (each document grows by < ``2*cp`` tokens; the
  figure is the row's growth).

Documents: log-normal lengths (sigma 1.0, given mean), drawn until the row is full, the last one
cut at the row's end. The figure of merit is max/mean of the per-rank work (the slowest rank sets
the step time), the mean and the worst over ``--rows`` random rows.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import parser, print_table, write_json  # noqa: E402
from nxd_cp.sequence.layout import document_index  # noqa: E402

SIGMA = 1.0


def document_lengths(rng: np.random.Generator, seq_len: int, mean: float) -> np.ndarray:
    """Log-normal lengths (>= 1) filling ``seq_len`` tokens exactly (the last one is cut)."""
    mu = math.log(mean) - SIGMA ** 2 / 2  # E[exp(N(mu, sigma^2))] = mean
    lengths, total = [], 0
    while total < seq_len:
        n = max(1, int(round(rng.lognormal(mu, SIGMA))))
        n = min(n, seq_len - total)
        lengths.append(n)
        total += n
    return np.asarray(lengths, dtype=np.int64)


def positions_in_documents(lengths: np.ndarray) -> np.ndarray:
    """``[sum(lengths)]``: each token's position inside its own document."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


def zigzag_work(lengths: np.ndarray, cp: int) -> np.ndarray:
    """Work per rank when the packed row is split in zigzag chunks."""
    work = positions_in_documents(lengths) + 1
    chunks = work.reshape(2 * cp, -1).sum(axis=1)
    return chunks[:cp] + chunks[::-1][:cp]


def per_document_work(lengths: np.ndarray, cp: int) -> np.ndarray:
    """Work per rank of nxd_cp's ``per_document`` layout (its own shard indices)."""
    work = torch.from_numpy(positions_in_documents(lengths) + 1)
    seq_idx = torch.repeat_interleave(torch.arange(len(lengths)), torch.from_numpy(lengths))[None]
    return np.array([int(work[document_index(seq_idx, r, cp)[0]].sum()) for r in range(cp)])


def head_tail_work(lengths: np.ndarray, cp: int):
    """(work per rank, padded row length) of the per-document head-tail split."""
    n = 2 * cp
    per_rank = np.zeros(cp, dtype=np.int64)
    padded = 0
    for length in lengths.tolist():
        piece = -(-length // n)  # ceil: the document padded to n * piece tokens
        padded += n * piece
        p = np.arange(n * piece, dtype=np.int64)
        w = np.where(p < length, p + 1, 0).reshape(n, piece).sum(axis=1)
        per_rank += w[:cp] + w[::-1][:cp]
    return per_rank, padded


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=32, help="random packed rows per setting")
    args = p.parse_args()
    lengths_s = (8192,) if args.quick else (32768, 131072)
    rows_n = 4 if args.quick else args.rows
    table, results = [], []
    for seq_len in lengths_s:
        for cp in (2, 4, 8, 16):
            rng = np.random.default_rng(1000 + seq_len + cp)
            zz, pd, ht, pad, docs = [], [], [], [], []
            for _ in range(rows_n):
                lengths = document_lengths(rng, seq_len, 2048.0)
                z = zigzag_work(lengths, cp)
                d = per_document_work(lengths, cp)
                h, padded = head_tail_work(lengths, cp)
                if not z.sum() == d.sum() == h.sum():
                    raise AssertionError("every split must cover the same attention work")
                zz.append(z.max() / z.mean())
                pd.append(d.max() / d.mean())
                ht.append(h.max() / h.mean())
                pad.append(padded / seq_len - 1)
                docs.append(len(lengths))
            row = dict(seq_len=seq_len, cp=cp, docs_mean=float(np.mean(docs)),
                       zigzag_mean=float(np.mean(zz)), zigzag_worst=float(np.max(zz)),
                       per_document_mean=float(np.mean(pd)),
                       per_document_worst=float(np.max(pd)),
                       head_tail_mean=float(np.mean(ht)), head_tail_worst=float(np.max(ht)),
                       padding_mean=float(np.mean(pad)), padding_worst=float(np.max(pad)))
            results.append(row)
            table.append([f"{seq_len:,}", cp, f"{row['docs_mean']:.1f}",
                          f"{row['zigzag_mean']:.3f}", f"{row['zigzag_worst']:.3f}",
                          f"{row['per_document_mean']:.4f}", f"{row['per_document_worst']:.4f}",
                          f"{row['head_tail_mean']:.4f}", f"{row['head_tail_worst']:.4f}",
                          f"{100 * row['padding_mean']:.2f}%"])
    print_table("Packed documents: attention work max/mean per CP rank (log-normal lengths, "
                f"mean 2,048, sigma {SIGMA}; {rows_n} rows per setting)",
                ["S", "cp", "docs/row", "zigzag mean", "zigzag worst", "per_document mean",
                 "per_document worst", "padded head-tail mean", "padded head-tail worst",
                 "its padding (mean)"], table,
                note="Work = visible (query, key) pairs, causal inside each document. "
                     "Zigzag over the packed row balances one long causal sequence, not many "
                     "short ones: a rank's share depends on where documents happen to start. "
                     "Head-tail balances every document: per_document (nxd_cp) without padding, "
                     "the padded variant (TransformerEngine, PyTorch) by padding each document "
                     "to a multiple of 2*cp.")
    write_json(args.json, {"sigma": SIGMA, "mean_length": 2048, "rows": results})


if __name__ == "__main__":
    main()
