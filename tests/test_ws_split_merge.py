"""The merge of a split last wave (``sage_attention_ws._merge_splits_kernel``), under TRITON_INTERPRET=1 in a
subprocess: partial results built in float64 the way the FA3-layout kernel's parts write them (unnormalised output,
running maximum in the log2 domain, row sum, per key range) must merge into softmax attention over all keys, times
V's per-channel scale, in the right (batch, head, rows), with rows past Lq and every other row block untouched.
The kernel's GPU test (tests/test_sage_attention_ws.py) checks the parts themselves against the unsplit kernel."""
from __future__ import annotations

import torch

from interp_subprocess import report_fixture, write_report  # (tests/ is on sys.path under pytest and as a script)

#: (B, H, Lq, D, splits, tail row blocks): Lq not a multiple of 128, the tail crossing a head boundary
CASES = [(2, 3, 300, 64, 3, 3), (1, 2, 200, 128, 4, 3), (1, 1, 128, 64, 2, 1)]


def _interpret_checks() -> dict:
    from turbocompile.kernels import sage_attention_ws as WS

    report = {"cases": []}
    for i, (b, h, lq, d, splits, tail) in enumerate(CASES):
        g = torch.Generator().manual_seed(i)
        n_m = -(-lq // 128)
        items = n_m * b * h
        item0 = items - tail
        lk = 97 * splits
        logits = torch.randn(items, 128, lk, generator=g, dtype=torch.float64) * 3  # log2 domain
        v = torch.randn(items, lk, d, generator=g, dtype=torch.float64)
        vs = torch.rand(b * h, d, generator=g, dtype=torch.float64) + 0.5
        n_split = tail * splits
        part = torch.empty(n_split * 128, d, dtype=torch.float64)
        ml = torch.empty(2, n_split * 128, dtype=torch.float64)
        bounds = [s * lk // splits for s in range(splits + 1)]
        for t in range(tail):
            x, vv = logits[item0 + t], v[item0 + t]
            for s in range(splits):
                xs, vp = x[:, bounds[s]:bounds[s + 1]], vv[bounds[s]:bounds[s + 1]]
                m = xs.amax(dim=1)
                p = torch.exp2(xs - m[:, None])
                rows = slice((t * splits + s) * 128, (t * splits + s + 1) * 128)
                part[rows], ml[0, rows], ml[1, rows] = p @ vp, m, p.sum(dim=1)
        out = torch.full((b, h, lq, d), float("nan"), dtype=torch.float32)
        WS._merge_splits_kernel[(tail, 4)](
            part.float(), ml.float().contiguous(), vs.float().contiguous(), out, out.stride(0), out.stride(1),
            out.stride(2), h, lq, item0, n_m, n_split * 128, SPLITS=splits, HEAD_DIM=d, ROWS=32)
        # expected: the tail row blocks' exact softmax attention times V's scale, nothing else written
        want = torch.full((b, h, lq, d), float("nan"), dtype=torch.float64)
        for t in range(tail):
            item = item0 + t
            bh, pid_m = item // n_m, item % n_m
            o = torch.softmax(logits[item] * torch.log(torch.tensor(2.0, dtype=torch.float64)), dim=1) @ v[item]
            o = o * vs[bh][None, :]
            r0, r1 = pid_m * 128, min(pid_m * 128 + 128, lq)
            want[bh // h, bh % h, r0:r1] = o[: r1 - r0]
        written = ~want.isnan()
        report["cases"].append({
            "case": [b, h, lq, d, splits, tail],
            "same_nan_pattern": bool(torch.equal(out.isnan(), want.isnan())),
            "written_rows": int(written.any(dim=-1).sum()),
            "max_err_over_max": float((out.double() - want).abs()[written].max() / want.abs()[written].max()),
        })
    return report


interp_report = report_fixture(__file__, "ws_split_merge.json", timeout=300)


def test_merge_of_split_parts_is_softmax_attention_over_all_keys(interp_report):
    for case in interp_report["cases"]:
        b, h, lq, d, splits, tail = case["case"]
        assert case["same_nan_pattern"], case  # the tail's rows (< Lq) written, nothing else
        assert case["written_rows"] > 0, case
        assert case["max_err_over_max"] <= 1e-5, case  # fp32 partials and merge against a float64 softmax


if __name__ == "__main__":  # the interpreter subprocess
    write_report(_interpret_checks())
