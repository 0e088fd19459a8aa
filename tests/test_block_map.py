"""Top-k LUT selection: the Triton kernels of ``topk_lut_triton`` (the search kernel, default, in each of its
options, and the radix-select kernel) under TRITON_INTERPRET=1 in a subprocess against ``torch.topk`` +
``torch.sort``, on random scores (exact equality), ties, NaN, ±0, ±inf, denormals and huge values (against a plain
Python ranking); the 3xTF32 score kernel (``block_scores_triton``) against a float64 matmul at odd shapes and strided
views; and, where a GPU exists, the CUDA path of ``lut_from_pooled`` and every selection option against each other
(the PTX ``set.ge`` path of the search kernel runs only there; its integer arithmetic runs in the interpreter as
``TopkConfig(emulate=True)``). The interpreter checks take ~25 s on 2 CPU cores."""
from __future__ import annotations

import pytest
import torch

from turbocompile.kernels.block_map import (TopkConfig, compare_luts, lut_from_pooled, num_kept_blocks,
                                            topk_lut_reference)

from interp_subprocess import report_fixture, write_report  # (tests/ is on sys.path under pytest and as a script)

POISON = -7

#: (rows, Nk, T): Nk not a power of two, Nk = 1, T = 1, T = Nk - 1, T = Nk, rows not a multiple of BLOCK_R
RANDOM_CASES = [(37, 100, 10), (5, 1, 1), (3, 17, 1), (9, 33, 32), (4, 17, 17), (6, 600, 60), (13, 256, 25),
                (2, 5, 4), (1, 1000, 999)]
#: (rows, Nk, T, distinct values): many equal scores per row
TIE_CASES = [(11, 64, 7, 3), (7, 100, 30, 5), (5, 40, 39, 2), (3, 50, 10, 1), (9, 300, 31, 11)]
#: search-kernel options beside the default (whose PTX path the interpreter replaces by plain Triton): the GPU
#: path's integer count emulated, key bisection only on 2 warps, one chunk (no 512 + 128 split) on 4 warps
SEARCH_CONFIGS = [TopkConfig(emulate=True), TopkConfig(strategy="bisect", warps=2),
                  TopkConfig(split=False, emulate=True, warps=4)]
#: (rows, Nk, T) for them: two chunks (600 = 512 + 128, 300 = 256 + 64, 591), one chunk, T = 1, T = Nk - 1, Nk = 1
SEARCH_CASES = [(5, 600, 60), (4, 300, 30), (3, 591, 59), (4, 256, 25), (3, 17, 1), (2, 33, 32), (2, 1, 1),
                (2, 100, 99)]
#: (Nk, T) of rows drawn from NaN, ±inf, ±0, ±denormal, ±3.4e38 and a few ordinary values
SPECIAL_CASES = [(7, 3), (45, 1), (45, 20), (45, 44), (150, 40)]
#: (B, H, Mq, Nk, D, config) of the score kernel: Mq, Nk not multiples of the tile, 1-row/1-column outputs
SCORE_CASES = [(1, 1, 1, 1, 64, None), (1, 2, 7, 3, 128, None), (2, 1, 65, 129, 64, None),
               (1, 1, 130, 129, 128, None), (1, 3, 130, 1, 64, (64, 64, 4)), (2, 2, 65, 129, 128, (32, 64, 4)),
               (1, 1, 7, 3, 48, None)]


def check_kept_set(scores: torch.Tensor, lut: torch.Tensor, t: int) -> list[str]:
    """What is wrong with ``lut`` [rows, t] as the t best columns of ``scores`` [rows, Nk], ties lowest-index first.

    Each row: t distinct in-range indices, ascending; every kept score >= every dropped score; among the columns
    equal to the smallest kept score, the kept ones are the lowest-indexed.
    """
    errs = []
    nk = scores.shape[-1]
    for r in range(scores.shape[0]):
        idx = lut[r].long()
        if not (idx.min() >= 0 and idx.max() < nk):
            errs.append(f"row {r}: index out of range {idx.tolist()}")
            continue
        if t > 1 and not bool((idx[1:] > idx[:-1]).all()):
            errs.append(f"row {r}: not strictly ascending {idx.tolist()}")
            continue
        kept = torch.zeros(nk, dtype=torch.bool)
        kept[idx] = True
        if (~kept).any():
            lo, hi = scores[r][kept].min(), scores[r][~kept].max()
            if lo < hi:
                errs.append(f"row {r}: kept score {lo} < dropped score {hi}")
            tied = (scores[r] == lo).nonzero().flatten()
            n_tied_kept = int(kept[tied].sum())
            if not bool(kept[tied[:n_tied_kept]].all()):
                errs.append(f"row {r}: ties not taken lowest index first")
    return errs


def check_near_topk(scores: torch.Tensor, lut: torch.Tensor, t: int, rtol: float = 1e-5) -> list[str]:
    """What is wrong with ``lut`` [rows, t] as the t best columns of ``scores`` [rows, Nk] up to near-ties.

    Each row: t distinct in-range indices, ascending, and every kept score >= the row's t-th largest score minus
    ``rtol`` x the row's largest |score| (scores computed another way may order near-equal scores differently).
    """
    nk = scores.shape[-1]
    idx = lut.long()
    errs = [f"row {r}: index out of range {idx[r].tolist()}" for r in
            ((idx < 0) | (idx >= nk)).any(-1).nonzero().flatten().tolist()]
    if errs:
        return errs
    if t > 1:
        errs += [f"row {r}: not strictly ascending {idx[r].tolist()}" for r in
                 (idx[:, 1:] <= idx[:, :-1]).any(-1).nonzero().flatten().tolist()]
    bound = torch.topk(scores, t, dim=-1).values[:, -1] - rtol * scores.abs().amax(-1)
    kept = scores.gather(-1, idx)
    errs += [f"row {r}: kept score {kept[r].min().item()} below the t-th best {bound[r].item()} (minus tolerance)"
             for r in (kept < bound[:, None]).any(-1).nonzero().flatten().tolist()]
    return errs


def ranked_reference(scores: torch.Tensor, t: int) -> torch.Tensor:
    """The documented order in plain Python: largest first, -0.0 == +0.0, NaN below -inf, ties lowest column first;
    the t first columns of each row, ascending (int32 [rows, t])."""
    out = []
    for row in scores.tolist():
        order = sorted(range(len(row)), key=lambda c: (row[c] != row[c], -(row[c] + 0.0) if row[c] == row[c] else 0, c))
        out.append(sorted(order[:t]))
    return torch.tensor(out, dtype=torch.int32)


def _special_scores(g: torch.Generator, rows: int, nk: int) -> torch.Tensor:
    inf, nan = float("inf"), float("nan")
    neg_nan = torch.tensor([-4194303], dtype=torch.int32).view(torch.float32)  # bits 0xFFC00001
    pool = torch.cat([torch.tensor([nan, inf, -inf, 0.0, -0.0, 1e-45, -1e-45, 3e-39, 3.4e38, -3.4e38, 1.0, -1.0, 2.5,
                                    1.0 + 2 ** -23]), neg_nan])
    return pool[torch.randint(0, len(pool), (rows, nk), generator=g)]


def _score_checks(g: torch.Generator) -> dict:
    """block_scores_triton against a float64 matmul; ``out`` prefilled with NaN so an unwritten element shows."""
    from turbocompile.kernels.block_map import block_scores_triton

    rep = {}
    for b, h, mq, nk, d, config in SCORE_CASES:
        pq = torch.randn(b, h, mq, d, generator=g) * 2 + 0.3
        # pooled_k as a non-contiguous view: [B, Nk, H, 2D] storage, every other channel
        pk = (torch.randn(b, nk, h, 2 * d, generator=g) - 0.2).transpose(1, 2)[..., ::2]
        assert not pk.is_contiguous()
        out = torch.full((b, h, mq, nk), float("nan"))
        res = block_scores_triton(pq, pk, out=out, config=config)
        ref = torch.matmul(pq.double(), pk.double().transpose(-1, -2))
        scale = torch.matmul(pq.double().abs(), pk.double().abs().transpose(-1, -2))  # sum |q_i k_i|
        rep[f"scores/{b}x{h}x{mq}x{nk}/d{d}/{config}"] = {
            "same_out": res.data_ptr() == out.data_ptr(), "nan": bool(torch.isnan(out).any()),
            "rel_err": float(((out.double() - ref).abs() / scale).max()),
            "rel_err_of_max": float((out.double() - ref).abs().max() / ref.abs().max())}
    # transposed pooled_q (stride over D != 1) and a default (out=None) call
    pq = torch.randn(1, 2, 64, 33, generator=g).transpose(-1, -2)
    pk = torch.randn(1, 2, 40, 64, generator=g)
    res = block_scores_triton(pq, pk)
    ref = torch.matmul(pq.double(), pk.double().transpose(-1, -2))
    rep["scores/transposed_q"] = {"same_out": res.is_contiguous() and res.shape == (1, 2, 33, 40),
                                  "nan": bool(torch.isnan(res).any()),
                                  "rel_err": float(((res.double() - ref).abs() /
                                                    torch.matmul(pq.double().abs(), pk.double().abs().mT)).max()),
                                  "rel_err_of_max": float((res.double() - ref).abs().max() / ref.abs().max())}
    return rep


def _interpret_checks() -> dict:
    from turbocompile.kernels.block_map import topk_lut_triton

    def run(scores, t, config=None):
        out = torch.full(scores.shape[:-1] + (t,), POISON, dtype=torch.int32)
        res = topk_lut_triton(scores, t, config, out=out)
        assert res.data_ptr() == out.data_ptr()
        return out

    rep: dict = {}
    g = torch.Generator().manual_seed(0)
    for rows, nk, t in RANDOM_CASES:
        s = torch.randn(rows, nk, generator=g) * 3 + 0.5  # both signs
        for config in (None, (4, 4), (1, 2)):
            o = run(s, t, config)
            rep[f"random/{rows}x{nk}/t{t}/{config}"] = {
                "equal": bool(torch.equal(o, topk_lut_reference(s, t))), "poison": bool((o == POISON).any())}
    # [B, H, Mq, Nk] scores as lut_from_pooled makes them, and a non-contiguous view
    pq, pk = torch.randn(2, 3, 7, 64, generator=g), torch.randn(2, 3, 45, 64, generator=g)
    s4 = torch.matmul(pq, pk.transpose(-1, -2)) * 64 ** -0.5
    t4 = num_kept_blocks(0.1, 45)
    rep["4d"] = {"equal": bool(torch.equal(run(s4, t4), topk_lut_reference(s4, t4))), "poison": False}
    sv = s4.transpose(2, 3)
    rep["non_contiguous"] = {"equal": bool(torch.equal(run(sv, 3), topk_lut_reference(sv, 3))), "poison": False}
    for rows, nk, t, distinct in TIE_CASES:
        s = torch.randint(-(distinct // 2), distinct - distinct // 2, (rows, nk), generator=g).float() * 0.25
        for config in ((4, 4), None, SEARCH_CONFIGS[1]):
            o = run(s, t, config)
            rep[f"ties/{rows}x{nk}/t{t}/v{distinct}/{config}"] = {"errors": check_kept_set(s, o, t),
                                                                   "poison": bool((o == POISON).any())}
    # the search kernel's options on random scores, rows of a wider tensor (row stride > Nk), special values
    for rows, nk, t in SEARCH_CASES:
        s = (torch.randn(rows, nk + 3, generator=g) * 2 - 0.3)[:, :nk]
        assert s.stride(0) == nk + 3
        ref = topk_lut_reference(s, t)
        for config in SEARCH_CONFIGS:
            o = run(s, t, config)
            rep[f"search/{rows}x{nk}/t{t}/{config}"] = {"equal": bool(torch.equal(o, ref)),
                                                         "poison": bool((o == POISON).any())}
    for nk, t in SPECIAL_CASES:
        s = _special_scores(g, 3, nk)
        ref = ranked_reference(s, t)
        for config in (None, (2, 1), *SEARCH_CONFIGS):
            o = run(s, t, config)
            rep[f"special_values/{nk}/t{t}/{config}"] = {"equal": bool(torch.equal(o, ref)),
                                                          "poison": bool((o == POISON).any())}
    # special values: ±inf and ±0 rank like torch (-0 == +0, ties lowest index); NaN ranks below -inf
    inf, nan = float("inf"), float("nan")
    s = torch.tensor([[0.0, -0.0, 1.0, -inf, inf, -1.0, 0.0, -0.0],
                      [nan, -inf, nan, -1e38, 3e-45, -3e-45, nan, 2.0]])
    rep["special"] = {"lut": [run(s, 4, c).tolist() for c in (None, (1, 1), *SEARCH_CONFIGS)]}
    rep["nan_row"] = {"lut": [run(torch.full((1, 6), nan), 3, c).tolist() for c in (None, (1, 1), *SEARCH_CONFIGS)]}
    rep.update(_score_checks(g))
    return rep


interp_report = report_fixture(__file__, "topk.json", timeout=300)


def test_interp_topk_random_scores_equal_torch(interp_report):
    rows = {k: r for k, r in interp_report.items() if k.startswith("random/")}
    assert len(rows) == 3 * len(RANDOM_CASES)
    for key, r in {**rows, "4d": interp_report["4d"], "non_contiguous": interp_report["non_contiguous"]}.items():
        assert r["equal"] and not r["poison"], (key, r)


def test_interp_topk_search_options_equal_torch(interp_report):
    rows = {k: r for k, r in interp_report.items() if k.startswith("search/")}
    assert len(rows) == len(SEARCH_CONFIGS) * len(SEARCH_CASES)
    for key, r in rows.items():
        assert r["equal"] and not r["poison"], (key, r)


def test_interp_topk_special_values_every_option(interp_report):
    rows = {k: r for k, r in interp_report.items() if k.startswith("special_values/")}
    assert len(rows) == (2 + len(SEARCH_CONFIGS)) * len(SPECIAL_CASES)
    for key, r in rows.items():
        assert r["equal"] and not r["poison"], (key, r)


def test_ranked_reference_order():
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[nan, -inf, 0.0, -0.0, 2.0, 0.0, nan]])
    assert ranked_reference(s, 1).tolist() == [[4]]
    assert ranked_reference(s, 3).tolist() == [[2, 3, 4]]  # -0.0 ties +0.0, lowest columns first
    assert ranked_reference(s, 6).tolist() == [[0, 1, 2, 3, 4, 5]]  # NaN below -inf, the first NaN first


def test_interp_topk_ties_lowest_index_first(interp_report):
    rows = {k: r for k, r in interp_report.items() if k.startswith("ties/")}
    assert len(rows) == 3 * len(TIE_CASES)
    for key, r in rows.items():
        assert not r["errors"] and not r["poison"], (key, r)


def test_interp_topk_special_values(interp_report):
    # row 0: +inf, 1.0, then the first two of the four zeros (-0 == +0); row 1: 2.0, 3e-45, -3e-45, -1e38
    for lut in interp_report["special"]["lut"]:
        assert lut == [[0, 1, 2, 4], [3, 4, 5, 7]]
    for lut in interp_report["nan_row"]["lut"]:
        assert lut == [[0, 1, 2]]  # all NaN: still t indices, lowest first


def test_interp_block_scores_match_float64(interp_report):
    rows = {k: r for k, r in interp_report.items() if k.startswith("scores/")}
    assert len(rows) == len(SCORE_CASES) + 1
    for key, r in rows.items():
        assert r["same_out"] and not r["nan"], (key, r)
        assert r["rel_err"] <= 1e-5 and r["rel_err_of_max"] <= 1e-5, (key, r)


def test_check_near_topk_accepts_near_ties_only():
    s = torch.tensor([[3.0, 1.0, 1.0 - 1e-6, 2.0, 0.5]])
    assert check_near_topk(s, torch.tensor([[0, 1, 3]]), 3) == []
    assert check_near_topk(s, torch.tensor([[0, 2, 3]]), 3) == []  # 1 - 1e-6 is within 1e-5 x 3 of 1.0
    assert check_near_topk(s, torch.tensor([[0, 3, 4]]), 3)  # 0.5 is not
    assert check_near_topk(s, torch.tensor([[0, 3, 3]]), 3)  # repeated index
    assert check_near_topk(s, torch.tensor([[3, 0, 1]]), 3)  # not ascending
    assert check_near_topk(s, torch.tensor([[0, 1, 5]]), 3)  # out of range


def test_check_kept_set_catches_wrong_luts():
    s = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0]])
    assert check_kept_set(s, torch.tensor([[0, 1, 3]]), 3) == []
    assert check_kept_set(s, torch.tensor([[0, 2, 3]]), 3)  # tie not lowest index first
    assert check_kept_set(s, torch.tensor([[0, 1, 2]]), 3)  # dropped 2.0 > kept 1.0
    assert check_kept_set(s, torch.tensor([[3, 0, 1]]), 3)  # not ascending


def test_compare_luts_tells_tie_choices_from_wrong_sets():
    s = torch.tensor([[3.0, 1.0, 1.0, 2.0, 1.0]])
    ref = torch.tensor([[0, 1, 3]], dtype=torch.int32)
    assert compare_luts(s, ref, ref) == {"equal": True, "rows_differ": 0, "same_scores": True}
    assert compare_luts(s, torch.tensor([[0, 3, 4]], dtype=torch.int32), ref) == {
        "equal": False, "rows_differ": 1, "same_scores": True}
    assert not compare_luts(s, torch.tensor([[0, 1, 2]], dtype=torch.int32), ref)["same_scores"]


def test_lut_from_pooled_cpu_uses_torch_and_keeps_all_shortcut():
    g = torch.Generator().manual_seed(1)
    pq, pk = torch.randn(1, 2, 5, 16, generator=g), torch.randn(1, 2, 9, 16, generator=g)
    scores = torch.matmul(pq, pk.transpose(-1, -2)) * 16 ** -0.5
    assert torch.equal(lut_from_pooled(pq, pk, 0.5), topk_lut_reference(scores, num_kept_blocks(0.5, 9)))
    assert torch.equal(lut_from_pooled(pq, pk, 1.0), torch.arange(9, dtype=torch.int32).expand(1, 2, 5, 9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mq,nk,topk", [(512, 256, 0.1), (1182, 591, 0.1), (7, 3000, 0.05), (3, 5, 0.5)])
def test_cuda_lut_from_pooled_equals_torch(mq, nk, topk):
    g = torch.Generator(device="cuda").manual_seed(nk)
    pq = torch.randn(1, 4, mq, 128, device="cuda", generator=g)
    pk = torch.randn(1, 4, nk, 128, device="cuda", generator=g)
    scores = torch.matmul(pq, pk.transpose(-1, -2)) * 128 ** -0.5
    lut = lut_from_pooled(pq, pk, topk)
    ref = topk_lut_reference(scores, num_kept_blocks(topk, nk))
    # the LUT's scores come from the 3xTF32 kernel, so it may differ from torch's only among scores equal within
    # fp32 rounding: t distinct ascending indices, each kept torch score >= torch's t-th best minus 1e-5 relative
    if not torch.equal(lut, ref):
        bad = (lut != ref).any(-1).flatten()
        t = ref.shape[-1]
        errs = check_near_topk(scores.reshape(-1, nk)[bad].cpu(), lut.reshape(-1, t)[bad].cpu(), t)
        assert not errs, errs[:5]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("nk,t", [(256, 25), (591, 59), (45, 20), (3000, 150), (7, 1)])
def test_cuda_topk_every_option_equal(nk, t):
    """The GPU-only PTX path of the search kernel and every other option give the radix kernel's LUT exactly.
    (Every option at the two Wan row lengths, the default and the radix kernel at the others: each option is a
    compile per row length, and the suite has a time budget.)"""
    from turbocompile.kernels.block_map import topk_lut_triton

    g = torch.Generator(device="cuda").manual_seed(nk)
    normal = torch.randn(257, nk, device="cuda", generator=g)
    special = _special_scores(torch.Generator().manual_seed(t), 64, nk).cuda()
    ties = torch.randint(-2, 3, (64, nk), device="cuda", generator=g).float()
    every = nk in (256, 591)
    for s in (normal, special, ties, torch.flip(normal, (1,))[:, : nk - 2]):
        tt = min(t, s.shape[-1])
        ref = ranked_reference(s.cpu(), tt).cuda()
        for config in ((None, (1, 4), (4, 4), TopkConfig(asm=False), TopkConfig(warps=2), TopkConfig(warps=4),
                        TopkConfig(split=False), TopkConfig(strategy="bisect"), TopkConfig(emulate=True))
                       if every else (None, (1, 4))):
            out = torch.full((s.shape[0], tt), POISON, dtype=torch.int32, device="cuda")
            lut = topk_lut_triton(s, tt, config, out=out)
            assert torch.equal(lut, ref), (nk, tt, config, int((lut != ref).any(-1).sum()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("b,h,mq,nk,d", [(1, 12, 512, 256, 128), (1, 40, 1182, 591, 128), (2, 3, 7, 129, 64),
                                         (1, 2, 130, 1, 128)])
def test_cuda_block_scores_match_float64(b, h, mq, nk, d):
    from turbocompile.kernels.block_map import block_scores_triton

    g = torch.Generator(device="cuda").manual_seed(mq)
    pq = torch.randn(b, h, mq, d, device="cuda", generator=g)
    pk = torch.randn(b, nk, h, d, device="cuda", generator=g).transpose(1, 2)  # non-contiguous, like a view
    out = torch.full((b, h, mq, nk), float("nan"), device="cuda")
    block_scores_triton(pq, pk, out=out)
    ref = torch.matmul(pq.double(), pk.double().transpose(-1, -2))
    scale = torch.matmul(pq.double().abs(), pk.double().abs().transpose(-1, -2))
    assert not torch.isnan(out).any()
    assert float(((out.double() - ref).abs() / scale).max()) <= 1e-5


if __name__ == "__main__":  # the interpreter subprocess
    write_report(_interpret_checks())
