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

* a2a (Ulysses, all-to-all over the n ranks): q, k, v and the output each send (n-1)/n of
  themselves, forward and (their gradients) backward: ``(n-1)/n (2 E_q + 2E) e`` per pass,
  ``E_q = B * Hq * S_local * D`` (K/V heads replicated to ``lcm(Hkv, n)`` where they do not
  split; not at these sizes);
* a2a+p2p (all-to-all inside groups of ``a``, ring over ``c = cp/a`` groups): the a2a of ``a``
  plus the ring of ``c`` ranks on K/V of ``Hkv/a`` heads over ``a`` shards (``E`` elements
  again): forward ``(c-1) 2E e``, backward ``(c-1) 2E e + c 2E 4``.

A repeat-KV design (K/V expanded to Hq heads before communication, as NxD's ring kernel takes
them) sends the same with ``Hq`` instead of ``Hkv``: our share of it is Hkv/Hq.
"""
from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import fmt_bytes, parser, print_table, run_ranks, write_json  # noqa: E402

HQ, HKV, D, B = 32, 8, 128, 1
A2A_SIZE = 2  # a2a+p2p: all-to-all inside pairs of CP ranks, the ring across them (cp >= 4)
DTYPE_NAME = "bfloat16"
TOLERANCE = 0.01


def formulas(cp: int, seq_len: int, hkv: int = HKV, e: int = 2) -> dict:
    """Bytes one rank sends per attention call: the issue's limit and this design, by pass."""
    n, elems = cp, B * hkv * (seq_len // cp) * D
    kv, dkv = 2 * elems * e, 2 * elems * 4
    q_elems = B * HQ * (seq_len // cp) * D

    def a2a(size):  # q, k, v and the output (or their gradients), (size-1)/size each
        return (size - 1) / size * (2 * q_elems + 2 * elems) * e

    a, c = A2A_SIZE, max(1, cp // A2A_SIZE)
    return {"limit": {"fwd": (n - 1) * kv, "bwd": (n - 1) * dkv},
            "p2p": {"fwd": (n - 1) * kv, "bwd": (n - 1) * kv + n * dkv},
            "all_gather": {"fwd": (n - 1) * kv, "bwd": (n - 1) * kv + (n - 1) * dkv},
            "a2a": {"fwd": a2a(n), "bwd": a2a(n)},
            "a2a+p2p": {"fwd": a2a(a) + (c - 1) * kv, "bwd": a2a(a) + (c - 1) * kv + c * dkv}}


def measure(rank: int, world: int, cps, seq_len: int):
    """Rank-side: bytes this rank sends, per cp and comm type, forward and backward."""
    import torch

    import nxd_cp
    from nxd_cp import parallel_state as ps
    from nxd_cp.topology.subgroups import context_subgroups

    dtype = getattr(torch, DTYPE_NAME)
    out = []
    for cp in cps:
        ps.initialize_model_parallel(context_parallel_size=cp)
        if cp >= 2 * A2A_SIZE:  # a2a+p2p's sub-groups: a collective of every rank, made now
            context_subgroups(ps.get_group_spec("context"), A2A_SIZE)
        if 0 not in ps.get_group_spec("context").ranks:  # other groups: the same figures
            ps.destroy_model_parallel()
            continue
        s_local = seq_len // cp
        g = torch.Generator().manual_seed(rank)
        q, k, v, dout = (torch.randn(B, h, s_local, D, generator=g).to(dtype)
                         for h in (HQ, HKV, HKV, HQ))
        for comm in ("p2p", "all_gather", "a2a", "a2a+p2p"):
            if comm == "a2a+p2p" and cp < 2 * A2A_SIZE:
                continue
            a2a_size = A2A_SIZE if comm == "a2a+p2p" else None
            for _ in range(2):  # the second call is measured (the first sets groups up)
                q_, k_, v_ = (t.clone().requires_grad_() for t in (q, k, v))
                start = time.perf_counter()
                with nxd_cp.count_bytes() as fwd:
                    o = nxd_cp.context_parallel_attention(q_, k_, v_, causal=True,
                                                          comm_type=comm, a2a_size=a2a_size)
                with nxd_cp.count_bytes() as bwd:
                    o.backward(dout)
                seconds = time.perf_counter() - start
            out.append(dict(cp=cp, comm=comm, fwd=fwd.total, bwd=bwd.total,
                            fwd_by=dict(fwd.bytes), bwd_by=dict(bwd.bytes),
                            seconds=round(seconds, 4)))
        ps.destroy_model_parallel()
    return out


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    cps = (2,) if args.quick else (2, 4, 8)
    seq_len = 256 if args.quick else 2048
    per_rank = run_ranks(measure, max(cps), cps, seq_len)
    for cp in cps:  # the ranks of a CP group must send the same bytes
        got = [[{k: v for k, v in m.items() if k != "seconds"} for m in r if m["cp"] == cp]
               for r in per_rank[:cp]]
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
                note="Formula (ours), with E = B*Hkv*S_local*D, E_q = B*Hq*S_local*D and e = 2 "
                     "bytes (bf16): forward (n-1)*2E*e for p2p and all_gather; backward p2p "
                     "(n-1)*2E*e + n*2E*4, all_gather (n-1)*2E*e + (n-1)*2E*4; a2a "
                     "(n-1)/n*(2E_q + 2E)*e each way; a2a+p2p (a = 2, c = cp/a): a2a of a plus "
                     "p2p of c. The issue's limit counts only dK/dV "
                     "in backward, (n-1)*2E*4; the difference is the K/V re-rotation / re-gather "
                     "(the price of saving only the local K/V for backward: memory 1/cp) and, "
                     "for p2p, the one extra hop that brings dK/dV home.")
    print_table("Communication vs a repeat-KV design (fwd + bwd)",
                ["cp", "comm", "ours", "repeat-KV (Hq heads)", "ratio", "Hkv/Hq"], ratio_rows)
    time_rows = []
    for m in per_rank[0]:
        base = next(x for x in per_rank[0] if x["cp"] == m["cp"] and x["comm"] == "p2p")
        time_rows.append([m["cp"], m["comm"], f"{m['seconds'] * 1e3:.1f}",
                          f"{m['seconds'] / base['seconds']:.2f}"])
    print_table("CPU time of one attention call, forward + backward (rank 0, one run)",
                ["cp", "comm", "ms", "vs p2p"], time_rows,
                note="gloo on this machine's shared cores, one intra-op thread per rank: a "
                     "ratio between comm types taken in one run, not a Trainium figure.")
    write_json(args.json, {"seq_len": seq_len, "shape": shape, "rows": results})


if __name__ == "__main__":
    main()
