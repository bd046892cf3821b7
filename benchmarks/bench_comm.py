"""Communication per rank: bytes sent by one attention call, forward and backward, vs the formula.

Runs ``context_parallel_attention`` on real gloo ranks (one world of ``max(cp)`` ranks, every
cp in turn, measured by the CP group that holds rank 0, whose ranks must all agree) and reads
``nxd_cp.count_bytes()``: the bytes this rank hands its transport to send, with the
bandwidth-optimal volume of each collective (ring all-gather: (n-1) local chunks;
reduce-scatter: (n-1)/n of its input; ring shift: the tensor). That is a property of the
algorithm, the same on gloo, NCCL and XLA, not a wire measurement of one backend.

GQA 32/8 heads, bf16 inputs. With ``E = B * Hkv * S_local * D`` elements per K (or V) shard,
``e`` bytes per input element and ``n = cp``:

* issue limit, forward: (n-1)/n of the gathered K/V = ``(n-1) 2E e``;
  backward: the same for dK/dV in fp32 = ``(n-1) 2E 4``;
* this design, forward (both comm types): ``(n-1) 2E e``;
* p2p backward: K/V re-rotated (``(n-1) 2E e``: only the local K/V are saved) and dK/dV in
  fp32 travelling with their block for ``n`` hops (``n 2E 4``: the last hop brings them home);
* all_gather backward: K/V re-gathered (``(n-1) 2E e``) and dK/dV reduce-scattered in fp32
  (``(n-1) 2E 4``).

A repeat-KV design (K/V expanded to Hq heads before communication, as NxD's ring kernel takes
them) sends the same with ``Hq`` instead of ``Hkv``: our share of it is Hkv/Hq.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt_bytes, parser, print_table, run_ranks, write_json  # noqa: E402

HQ, HKV, D, B = 32, 8, 128, 1
DTYPE_NAME = "bfloat16"
TOLERANCE = 0.01


def formulas(cp: int, seq_len: int, hkv: int = HKV, e: int = 2) -> dict:
    """Bytes one rank sends per attention call: the issue's limit and this design, by pass."""
    n, elems = cp, B * hkv * (seq_len // cp) * D
    kv, dkv = 2 * elems * e, 2 * elems * 4
    return {"limit": {"fwd": (n - 1) * kv, "bwd": (n - 1) * dkv},
            "p2p": {"fwd": (n - 1) * kv, "bwd": (n - 1) * kv + n * dkv},
            "all_gather": {"fwd": (n - 1) * kv, "bwd": (n - 1) * kv + (n - 1) * dkv}}


def measure(rank: int, world: int, cps, seq_len: int):
    """Rank-side: bytes this rank sends, per cp and comm type, forward and backward."""
    import torch

    import nxd_cp
    from nxd_cp import parallel_state as ps

    dtype = getattr(torch, DTYPE_NAME)
    out = []
    for cp in cps:
        ps.initialize_model_parallel(context_parallel_size=cp)
        if 0 not in ps.get_group_spec("context").ranks:  # other groups: the same figures
            ps.destroy_model_parallel()
            continue
        s_local = seq_len // cp
        g = torch.Generator().manual_seed(rank)
        q, k, v, dout = (torch.randn(B, h, s_local, D, generator=g).to(dtype)
                         for h in (HQ, HKV, HKV, HQ))
        for comm in ("p2p", "all_gather"):
            q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
            with nxd_cp.count_bytes() as fwd:
                o = nxd_cp.context_parallel_attention(q_, k_, v_, causal=True, comm_type=comm)
            with nxd_cp.count_bytes() as bwd:
                o.backward(dout)
            out.append(dict(cp=cp, comm=comm, fwd=fwd.total, bwd=bwd.total,
                            fwd_by=dict(fwd.bytes), bwd_by=dict(bwd.bytes)))
        ps.destroy_model_parallel()
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cps = (2,) if args.quick else (2, 4, 8)
    seq_len = 256 if args.quick else 2048
    per_rank = run_ranks(measure, max(cps), cps, seq_len)
    for cp in cps:  # the ranks of a CP group must send the same bytes
        got = [[m for m in r if m["cp"] == cp] for r in per_rank[:cp]]
        if any(g != got[0] for g in got):
            raise AssertionError(f"cp={cp}: ranks sent different byte counts")

    rows, ratio_rows, results = [], [], []
    for m in per_rank[0]:
        f = formulas(m["cp"], seq_len)
        repeat = formulas(m["cp"], seq_len, hkv=HQ)[m["comm"]]
        res = dict(m, formula=f[m["comm"]], limit=f["limit"], repeat_kv=repeat)
        for pas in ("fwd", "bwd"):
            got, want, lim = m[pas], f[m["comm"]][pas], f["limit"][pas]
            res[f"{pas}_vs_formula"] = got / want
            res[f"{pas}_vs_limit"] = got / lim
            ok = "yes" if abs(got / want - 1) <= TOLERANCE else "NO"
            rows.append([m["cp"], m["comm"], pas, fmt_bytes(got), fmt_bytes(want),
                         f"{got / want:.4f}",
                         ok, fmt_bytes(lim), f"{got / lim:.3f}"])
        total, rep = m["fwd"] + m["bwd"], repeat["fwd"] + repeat["bwd"]
        res["vs_repeat_kv"] = total / rep
        ratio_rows.append([m["cp"], m["comm"], fmt_bytes(total), fmt_bytes(rep),
                           f"{total / rep:.4f}", f"{HKV / HQ:.4f}"])
        results.append(res)

    shape = f"B={B}, Hq={HQ}, Hkv={HKV}, D={D}, S={seq_len}, {DTYPE_NAME}"
    print_table(f"Communication per rank and attention call ({shape})",
                ["cp", "comm", "pass", "sent", "formula (ours)", "ratio", "±1%",
                 "issue limit", "sent/limit"], rows,
                note="Formula (ours), with E = B*Hkv*S_local*D and e = 2 bytes (bf16): forward "
                     "(n-1)*2E*e for both comm types; backward p2p (n-1)*2E*e + n*2E*4, "
                     "all_gather (n-1)*2E*e + (n-1)*2E*4. The issue's limit counts only dK/dV "
                     "in backward, (n-1)*2E*4; the difference is the K/V re-rotation / re-gather "
                     "(the price of saving only the local K/V for backward: memory 1/cp) and, "
                     "for p2p, the one extra hop that brings dK/dV home.")
    print_table("Communication vs a repeat-KV design (fwd + bwd)",
                ["cp", "comm", "ours", "repeat-KV (Hq heads)", "ratio", "Hkv/Hq"], ratio_rows)
    write_json(args.json, {"seq_len": seq_len, "shape": shape, "rows": results})


if __name__ == "__main__":
    main()
