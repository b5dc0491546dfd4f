"""Scout: does sdpa_backward(max_total_seq_len_q/kv=...) shrink cuDNN's backward workspace on this
cuDNN, with correct gradients? Ragged THD packs with one long document, causal, bf16, 16 heads d128.
Prints workspace GiB with and without the attribute, bwd ms, and dq/dk/dv error vs flexcp triton.

    (project root; the cuDNN frontend wheel installed as in README.md here; this folder copied beside)
    PYTHONPATH=/tmp/site:. python3 cudnn_workspace_total.py
"""
import json, sys, traceback
import numpy as np, torch, triton
import cudnn, flexcp
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
import cudnn_frontend_ragged as S  # reuse its graph helpers (H=16, D=128)

H, D = S.H, S.D
handle = S.handle


def bwd_graph(b, mq, mk, total_q, total_k, use_total):
    gb = cudnn.pygraph(io_data_type=S.BF16, intermediate_data_type=S.F32, compute_data_type=S.F32, handle=handle)
    q2, k2, v2, o2, do2 = S.thd(gb, "q", b, mq), S.thd(gb, "k", b, mk), S.thd(gb, "v", b, mk), S.thd(gb, "o", b, mq), S.thd(gb, "do", b, mq)
    st2 = gb.tensor(name="st", dim=[b, H, mq, 1], stride=[H * mq, mq, 1, 1], data_type=S.F32)
    r = {n: S.small(gb, n, b + 1) for n in ("rq", "rk", "rv", "ro", "rdo", "rdq", "rdk", "rdv")}
    q2.set_ragged_offset(r["rq"]); k2.set_ragged_offset(r["rk"]); v2.set_ragged_offset(r["rv"])
    o2.set_ragged_offset(r["ro"]); do2.set_ragged_offset(r["rdo"])
    sq2, sk2 = S.small(gb, "sq", b), S.small(gb, "sk", b)
    extra = dict(max_total_seq_len_q=total_q, max_total_seq_len_kv=total_k) if use_total else {}
    dq, dk, dv = gb.sdpa_backward(name="sdpa_bwd", q=q2, k=k2, v=v2, o=o2, dO=do2, stats=st2, attn_scale=D ** -0.5,
                                  use_causal_mask=True, use_padding_mask=True, seq_len_q=sq2, seq_len_kv=sk2, **extra)
    dq.set_output(True).set_dim([b, H, mq, D]).set_stride([mq * H * D, D, H * D, 1]).set_ragged_offset(r["rdq"])
    dk.set_output(True).set_dim([b, H, mk, D]).set_stride([mk * H * D, D, H * D, 1]).set_ragged_offset(r["rdk"])
    dv.set_output(True).set_dim([b, H, mk, D]).set_stride([mk * H * D, D, H * D, 1]).set_ragged_offset(r["rdv"])
    w = S.finish(gb)
    return gb, w, dict(q=q2, k=k2, v=v2, o=o2, do=do2, st=st2, sq=sq2, sk=sk2, dq=dq, dk=dk, dv=dv, **r)


def case(name, lens):
    lens = np.asarray(lens); b, T, m = len(lens), int(lens.sum()), int(lens.max())
    cu = np.concatenate([[0], np.cumsum(lens)])
    q = torch.randn(T, H, D, device="cuda", dtype=torch.bfloat16); k = torch.randn_like(q); v = torch.randn_like(q); do = torch.randn_like(q)
    spec = flexcp.AttnMaskSpec.varlen(lens.tolist())
    qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
    o_tr, lse_tr = flexcp.attention(qq, kk, vv, spec, backend="triton"); o_tr.backward(do)
    ref = (qq.grad, kk.grad, vv.grad)
    fwd, _ = S.build(b, m, m, True)
    dev = lambda a: torch.tensor(a, dtype=torch.int32, device="cuda").reshape(-1, 1, 1, 1)
    off, sl = dev(cu * H * D), dev(lens)
    o = torch.empty_like(q); st = torch.empty(b, H, m, 1, device="cuda", dtype=torch.float32)
    t = fwd["t"]
    fwd["g"].execute({t["q"]: q, t["k"]: k, t["v"]: v, t["rq"]: off, t["rk"]: off, t["rv"]: off, t["ro"]: off,
                      t["sq"]: sl, t["sk"]: sl, t["o"]: o, t["st"]: st}, fwd["w"], handle=handle)
    row = {"case": name, "docs": b, "tokens": T, "max_len": m}
    for use_total in (False, True):
        key = "with_total" if use_total else "padded"
        try:
            total = int((T + 63) // 64 * 64)
            g, w, tb = bwd_graph(b, m, m, total, total, use_total)
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            pack = {tb["q"]: q, tb["k"]: k, tb["v"]: v, tb["o"]: o, tb["do"]: do, tb["st"]: st, tb["sq"]: sl, tb["sk"]: sl,
                    tb["dq"]: dq, tb["dk"]: dk, tb["dv"]: dv, **{tb[n]: off for n in ("rq", "rk", "rv", "ro", "rdo", "rdq", "rdk", "rdv")}}
            run = lambda: g.execute(pack, w, handle=handle)
            run(); torch.cuda.synchronize()
            errs = {n: float((a.float() - r.float()).norm() / r.float().norm()) for n, a, r in zip(("dq", "dk", "dv"), (dq, dk, dv), ref)}
            row[key] = {"workspace_gib": round(w.numel() / 2**30, 3), "bwd_ms": round(triton.testing.do_bench(run, warmup=10, rep=50), 2),
                        "rel_err_vs_triton": {n: round(e, 5) for n, e in errs.items()}, "all_zero_dq": bool((dq == 0).all())}
            del w
        except Exception:
            row[key] = {"error": traceback.format_exc()[-600:]}
        torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)


print(json.dumps({"cudnn": cudnn.backend_version(), "fe": getattr(cudnn, "__version__", "?"), "torch": torch.__version__}), flush=True)
for S_, big in [(32768, 20000), (65536, 45000), (131072, 100000), (262144, 200000)]:
    rest = S_ - big; L = [2000] * (rest // 2000); L[-1] += rest - sum(L); L = L[: len(L) // 2] + [big] + L[len(L) // 2:]
    case(f"{S_ // 1024}k_one_{big}", L)
