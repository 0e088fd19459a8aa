"""LUT pairing (kernels/lut_pairing.py): the Triton kernel under the interpreter against the PyTorch reference, and
what the pairing must keep (each row's set of key blocks) and give (a row pair's shared blocks at the same
positions)."""
from __future__ import annotations

import pytest
import torch

from turbocompile.kernels.lut_pairing import pair_lut_rows, pair_lut_rows_reference

from interp_subprocess import report_fixture, write_report  # (tests/ is on sys.path under pytest and as a script)


def _correlated_lut(b: int, h: int, mq: int, nk: int, t: int, seed: int) -> torch.Tensor:
    """Sorted top-t rows of scores that drift from row to row, so adjacent rows share most of their blocks."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, h, mq, nk, generator=g).cumsum(2) + 0.3 * torch.rand(b, h, mq, nk, generator=g) * mq
    return scores.topk(t, dim=-1).indices.sort(-1).values.to(torch.int32)


@pytest.mark.parametrize("b,h,mq,nk,t", [(1, 2, 7, 16, 5), (2, 3, 8, 40, 25), (1, 1, 5, 300, 100), (1, 2, 3, 4, 1),
                                         (1, 1, 1, 10, 3), (1, 2, 6, 8, 8)])
def test_pairing_keeps_each_rows_blocks_and_aligns_the_shared_ones(b, h, mq, nk, t):
    lut = _correlated_lut(b, h, mq, nk, t, seed=mq * nk + t)
    out = pair_lut_rows_reference(lut)
    assert torch.equal(out.sort(-1).values, lut)  # the same set of key blocks in every row
    for m in range(0, mq - 1, 2):
        r0, r1 = lut[:, :, m].long(), lut[:, :, m + 1].long()
        n_shared = (r0.unsqueeze(-1) == r1.unsqueeze(-2)).any(-1).sum(-1)  # [B, H]
        x, y = out[:, :, m], out[:, :, m + 1]
        for i in range(b):
            for j in range(h):
                s = int(n_shared[i, j])
                assert torch.equal(x[i, j, :s], y[i, j, :s])  # shared blocks first, at the same positions
                assert torch.equal(x[i, j, :s], x[i, j, :s].sort().values)
                assert not (x[i, j, s:].unsqueeze(-1) == y[i, j, s:].unsqueeze(-2)).any()  # the rest differ
                assert torch.equal(x[i, j, s:], x[i, j, s:].sort().values)
    if mq % 2:
        assert torch.equal(out[:, :, -1], lut[:, :, -1])  # a lone last row stays as it is


#: (B, H, Mq, Nk, T): an odd row count, T = 25 (1.3B@480p's top-k 0.1), T = 100 (T_PAD 128: r1 read in chunks), T = 1,
#: one row
INTERP_CASES = [(1, 2, 7, 16, 5), (2, 3, 8, 40, 25), (1, 1, 5, 300, 100), (1, 2, 3, 4, 1), (1, 1, 1, 10, 3)]


def _interpret_checks() -> dict:
    report = {}
    for i, (b, h, mq, nk, t) in enumerate(INTERP_CASES):
        lut = _correlated_lut(b, h, mq, nk, t, seed=t)
        report[str(i)] = bool(torch.equal(pair_lut_rows(lut), pair_lut_rows_reference(lut)))
    return report


interp_report = report_fixture(__file__, "lut_pairing.json", timeout=300)


@pytest.mark.parametrize("i", range(len(INTERP_CASES)))
def test_triton_kernel_matches_the_reference_under_the_interpreter(interp_report, i):
    assert interp_report[str(i)], INTERP_CASES[i]


def test_rejects_a_lut_that_is_not_int32_4d():
    with pytest.raises(ValueError, match="int32 LUT"):
        pair_lut_rows(torch.zeros(2, 3, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32 LUT"):
        pair_lut_rows(torch.zeros(1, 2, 3, 4, dtype=torch.int64))


if __name__ == "__main__":  # the interpreter subprocess
    write_report(_interpret_checks())
