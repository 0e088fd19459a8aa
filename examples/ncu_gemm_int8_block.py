import torch, math
from turbocompile.kernels.gemm_int8_block_gluon import _random_inputs, gemm_int8_block_gluon
g = torch.Generator(device="cuda").manual_seed(0)
a, sa, w, sw, b = _random_inputs(32760, 5120, 5120, g, torch.device("cuda"))
for _ in range(3):
    gemm_int8_block_gluon(a, sa, w, sw, b)
torch.cuda.synchronize()
