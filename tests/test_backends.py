"""Lowering backends: ONNX (export + onnxruntime with our Python ops), AOTInductor, TensorRT (refusal here).

The ONNX round trips build ``wan-tiny`` for the CPU with ``--backend onnx`` and compare the onnxruntime output with
the eager diffusers model of the same seed on fresh random inputs: bit-for-bit up to float rounding without the
acceleration passes, within the quantization drift of the artifact's own torch program with them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from turbocompile.backends import check_backend, lower, open_engine
from turbocompile.errors import ArtifactError, BackendUnavailableError, GPUError
from turbocompile.modeling import example_inputs, random_dit
from turbocompile.plugins.onnx_schemas import DOMAIN, OP_SPECS, OPSET_VERSION, register_schemas
from turbocompile.zoo import get_model

ACCEL = ("attention_to_sagesla", "linear_to_w8a8", "fuse_norms")
SPEC = get_model("wan-tiny")


def _has_tensorrt() -> bool:
    try:
        import tensorrt  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


HAS_TRT = _has_tensorrt()
NO_TRT = "TensorRT is not installed (it cannot be on the project's machines; see docs/tensorrt.md)"


def _build(tmp: Path, name: str, backend: str, accel: bool) -> Path:
    from turbocompile.build import BuildOptions, build

    return build(BuildOptions(model="wan-tiny", out=tmp / name, backend=backend,
                              skip_passes=[] if accel else list(ACCEL)))


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture(scope="module")
def builds(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("lowered")
    return {"plain": _build(tmp, "plain", "onnx", accel=False), "accel": _build(tmp, "accel", "onnx", accel=True)}


@pytest.fixture(scope="module")
def probe() -> tuple[torch.Tensor, ...]:
    """Fresh random inputs (not the build's example inputs) and the eager model's output for them."""
    x, t, ctx = example_inputs(SPEC, 160, 96, 17, seed=1234)
    t = torch.tensor([517.0])
    with torch.no_grad():
        ref = random_dit(SPEC, seed=0)(x, t, ctx, return_dict=False)[0]
    return x, t, ctx, ref


# ------------------------------------------------------------------------------------------------------------------
# ONNX
# ------------------------------------------------------------------------------------------------------------------
def test_onnx_plain_round_trip_matches_eager(builds, probe):
    x, t, ctx, ref = probe
    root = builds["plain"]
    manifest = _manifest(root)
    assert manifest["backend"] == "onnx" and manifest["backend_files"] == {"main": "experts/main/model.onnx"}
    assert "experts/main/model.onnx" in manifest["files"]  # hashed like every artifact file
    engine = open_engine(root, manifest, "cpu")
    out = engine.expert("main")(x, t, ctx)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), float((out - ref).abs().max())
    assert _rel(out, ref) < 1e-5


def test_onnx_accelerated_round_trip_matches_pytorch(builds, probe):
    from turbocompile.backends.bound import load_bound

    x, t, ctx, ref = probe
    root = builds["accel"]
    manifest = _manifest(root)
    out = open_engine(root, manifest, "cpu").expert("main")(x, t, ctx)
    with torch.no_grad():
        program = load_bound(root / "experts" / "main", manifest["expert_info"]["main"])(x, t, ctx)
    assert torch.isfinite(out).all()
    # Same graph in PyTorch and onnxruntime: only float summation order differs (which can flip an int8 rounding)
    assert _rel(out, program) < 0.01
    # Against eager: the drift the quantized passes introduce, no more (the pipeline's max drift is 0.05 per pass)
    drift = _rel(program, ref)
    assert drift < 0.1
    assert _rel(out, ref) < drift + 0.01
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.99


def test_onnx_graph_is_valid_and_has_turbocompile_nodes(builds):
    import onnx

    from turbocompile.backends.onnx_export import custom_nodes

    register_schemas()
    accel = onnx.load(str(builds["accel"] / "experts/main/model.onnx"))
    onnx.checker.check_model(accel, full_check=True)  # full_check runs our schemas' shape inference too
    nodes = custom_nodes(accel)
    layers = SPEC.dit.num_layers
    assert nodes.get("sage_sla") == layers and nodes.get("sage_attention") == layers
    # fused q/k/v, o, cross q, fused context k/v, cross o, two FFN layers
    assert nodes.get("int8_block_linear") == 7 * layers
    assert nodes.get("rms_norm") == 4 * layers and nodes.get("layernorm_modulate") == 2 * layers
    assert {(o.domain, o.version) for o in accel.opset_import} >= {(DOMAIN, OPSET_VERSION)}
    # the runtime feeds only x, timestep, context: the weights are initializers
    assert [i.name for i in accel.graph.input] == ["x", "timestep", "context"]
    assert len(accel.graph.initializer) > 50
    int8 = [t for t in accel.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) == 7 * layers
    plain = onnx.load(str(builds["plain"] / "experts/main/model.onnx"))
    onnx.checker.check_model(plain, full_check=True)
    assert custom_nodes(plain) == {}


def test_schemas_match_the_torch_ops():
    import turbocompile.kernels as kernels

    kernels.load_ops()
    for spec in OP_SPECS.values():
        schema = getattr(torch.ops.turbocompile, spec.name).default._schema
        tensors = [a.name for a in schema.arguments if "Tensor" in str(a.type)]
        scalars = [(a.name, "float" if str(a.type) == "float" else "int")
                   for a in schema.arguments if "Tensor" not in str(a.type)]
        assert tuple(tensors) == spec.input_names, spec.name
        assert tuple(scalars) == spec.attrs, spec.name


def test_every_custom_op_has_a_translation():
    from turbocompile.backends.onnx_export import _translations

    import turbocompile.kernels as kernels

    kernels.load_ops()
    table = _translations()
    assert {op.name().split("::")[1] for op in table} == set(OP_SPECS)


def _single_node_model(op: str, inputs: dict[str, torch.Tensor], attrs: dict, out_shape: list[int]):
    import onnx
    from onnx import TensorProto, helper

    types = {torch.float32: TensorProto.FLOAT, torch.int8: TensorProto.INT8}
    node = helper.make_node(op, list(inputs), ["y"], domain=DOMAIN, **attrs)
    graph = helper.make_graph([node], op, [helper.make_tensor_value_info(n, types[v.dtype], list(v.shape))
                                           for n, v in inputs.items()],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18),
                                                    helper.make_opsetid(DOMAIN, OPSET_VERSION)])
    register_schemas()
    onnx.checker.check_model(model, full_check=True)
    return model


def _op_case(op: str, gen: torch.Generator) -> tuple[dict[str, torch.Tensor], dict]:
    from turbocompile.kernels import linear_w8a8

    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    if op == "sage_attention":
        return {"q": r(1, 2, 80, 64), "k": r(1, 2, 72, 64), "v": r(1, 2, 72, 64)}, {"blk_q": 32, "blk_k": 16}
    if op in ("sage_sla", "sla"):
        return ({"q": r(1, 2, 96, 64), "k": r(1, 2, 96, 64), "v": r(1, 2, 96, 64), "proj_weight": 0.1 * r(64, 64),
                 "proj_bias": r(64)}, {"topk": 0.5, "blk_q": 32, "blk_k": 32})
    if op == "int8_block_linear":
        q = linear_w8a8.quantize_weight(r(200, 160), "int8-block")
        return {"x": r(2, 70, 160), "w_q": q["w_q"], "w_scale": q["w_scale"], "bias": r(200)}, {}
    if op == "layernorm_modulate":
        return {"x": r(2, 30, 96), "shift": r(2, 1, 96), "scale": r(2, 1, 96)}, {"eps": 1e-6}
    if op == "layer_norm_affine":
        return {"x": r(2, 30, 96), "weight": r(96), "bias": r(96)}, {"eps": 1e-6}
    return {"x": r(2, 30, 96), "weight": r(96)}, {"eps": 1e-6}


@pytest.mark.parametrize("op", ["sage_attention", "sage_sla", "sla", "int8_block_linear", "layernorm_modulate",
                                "layer_norm_affine", "rms_norm"])
def test_python_op_in_onnxruntime_matches_torch_op(op):
    import onnxruntime as ort

    from turbocompile.backends.onnx_runtime import register_python_ops

    inputs, attrs = _op_case(op, torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = getattr(torch.ops.turbocompile, op)(*inputs.values(), *attrs.values())
    model = _single_node_model(op, inputs, attrs, list(ref.shape))
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(register_python_ops())
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {n: v.numpy() for n, v in inputs.items()})
    out = torch.from_numpy(out)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert torch.equal(out, ref)


def test_onnx_external_data_round_trip(builds, probe, tmp_path, monkeypatch):
    """Models over 2 GB keep their weights in one external file; forced here with a zero threshold."""
    import onnx

    from turbocompile.backends import onnx_export
    from turbocompile.backends.onnx_runtime import OnnxExpert

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    root = builds["plain"]
    manifest = _manifest(root)
    files = onnx_export.export_expert(root / "experts/main", manifest["expert_info"]["main"], torch.float32,
                                      out=tmp_path / "model.onnx")
    assert [f.name for f in files] == ["model.onnx", "model.onnx.data"]
    assert files[0].stat().st_size < files[1].stat().st_size // 10  # the weights are in the data file
    model = onnx.load(str(files[0]), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer if t.dims
               and max(t.dims) > 64)
    x, t, ctx, ref = probe
    assert _rel(OnnxExpert(files[0])(x, t, ctx), ref) < 1e-5


def test_onnx_engine_protocol_and_refusals(builds):
    from turbocompile.backends.onnx_runtime import _check_runnable

    root = builds["plain"]
    manifest = _manifest(root)
    engine = open_engine(root, manifest, "cpu")
    assert engine.expert_names == ("main",)
    assert (engine.width, engine.height, engine.frames) == (160, 96, 17)
    assert engine.dtype == torch.float32 and engine.device == torch.device("cpu") and engine.spec.id == "wan-tiny"
    engine.prefetch("main")
    engine.release("main")
    with pytest.raises(BackendUnavailableError, match="onnxruntime on the CPU"):
        open_engine(root, manifest, "cuda")
    with pytest.raises(BackendUnavailableError, match="not a lowered backend"):
        open_engine(root, {**manifest, "backend": "torch"})
    bf16 = _single_node_model("rms_norm", {"x": torch.zeros(1, 2, 8), "weight": torch.zeros(8)}, {"eps": 1e-6},
                              [1, 2, 8])
    bf16.graph.input[0].type.tensor_type.elem_type = 16  # BFLOAT16
    path = root.parent / "bf16.onnx"
    import onnx

    onnx.save(bf16, str(path))
    with pytest.raises(BackendUnavailableError, match="bfloat16") as info:
        _check_runnable(path)
    assert "\n" not in str(info.value)


def test_turbocompile_load_opens_the_lowered_engine(builds, probe):
    """``turbocompile.load`` (hash checks first) hands onnx artifacts to ``open_engine``."""
    import turbocompile
    from turbocompile.backends.engine import LoweredEngine

    x, t, ctx, ref = probe
    engine = turbocompile.load(builds["plain"])
    assert isinstance(engine, LoweredEngine) and engine.backend == "onnx"
    assert _rel(engine.expert("main")(x, t, ctx), ref) < 1e-5


def test_tampered_onnx_model_is_refused(builds, tmp_path):
    import shutil

    import turbocompile

    root = tmp_path / "copy"
    shutil.copytree(builds["plain"], root)
    model = root / "experts/main/model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ArtifactError):
        turbocompile.load(root)


def test_onnx_refuses_other_shapes_in_one_line(builds):
    from turbocompile.errors import UnsupportedShapeError

    root = builds["plain"]
    expert = open_engine(root, _manifest(root), "cpu").expert("main")
    x, t, ctx = example_inputs(SPEC, 160, 96, 9, seed=2)  # 3 latent frames, built for 5
    with pytest.raises(UnsupportedShapeError, match=r"exported for x of shape \[1, 16, 5, 12, 20\], got "
                                                    r"\[1, 16, 3, 12, 20\]") as info:
        expert(x, t, ctx)
    assert "\n" not in str(info.value)


def test_onnx_missing_model_file_is_an_artifact_error(builds, tmp_path):
    manifest = _manifest(builds["plain"])
    with pytest.raises(ArtifactError, match="rebuild the artifact with --backend onnx"):
        open_engine(tmp_path, manifest, "cpu")


# ------------------------------------------------------------------------------------------------------------------
# AOTInductor
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_aoti_round_trip_matches_pytorch(tmp_path, probe):
    """Compiles wan-tiny with all passes into an AOTInductor package (about 45-60 s on 2 CPU cores)."""
    from turbocompile.backends.bound import load_bound

    try:
        check_backend("aoti", "cpu")
    except BackendUnavailableError as exc:
        pytest.skip(str(exc))
    root = _build(tmp_path, "aoti", "aoti", accel=True)
    manifest = _manifest(root)
    assert manifest["backend_files"] == {"main": "experts/main/aoti.pt2"}
    x, t, ctx, ref = probe
    engine = open_engine(root, manifest)
    out = engine.expert("main")(x, t, ctx)
    with torch.no_grad():
        program = load_bound(root / "experts" / "main", manifest["expert_info"]["main"])(x, t, ctx)
    assert torch.isfinite(out).all()
    assert _rel(out, program) < 0.01
    assert _rel(out, ref) < _rel(program, ref) + 0.01


def test_aoti_refuses_torch_211_on_cuda(monkeypatch):
    from turbocompile.backends import aoti

    monkeypatch.setattr(aoti, "_torch_version", lambda: "2.11.0+cu130")
    with pytest.raises(BackendUnavailableError, match=r"torch 2\.11\.0\+cu130 on cuda") as info:
        aoti.check_aoti("cuda")
    assert "\n" not in str(info.value) and "--backend torch" in str(info.value)
    with pytest.raises(BackendUnavailableError, match="torch 2.11.0"):
        check_backend("aoti", "sm_90")
    aoti.check_aoti("cpu")  # the CPU path works on 2.11


def test_aoti_refuses_package_of_another_torch_or_device(builds):
    manifest = {**_manifest(builds["plain"]), "backend": "aoti"}
    with pytest.raises(ArtifactError, match="compiled with torch 2.0.0"):
        open_engine(builds["plain"], {**manifest, "versions": {"torch": "2.0.0"}})
    with pytest.raises(BackendUnavailableError, match="runs only there"):
        open_engine(builds["plain"], manifest, "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(GPUError, match="sm_90"):
            open_engine(builds["plain"], {**manifest, "target": "sm_90"})


# ------------------------------------------------------------------------------------------------------------------
# TensorRT
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed here: the refusal path does not apply")
def test_tensorrt_backend_refuses_in_one_line(tmp_path):
    with pytest.raises(BackendUnavailableError) as info:
        check_backend("tensorrt")
    msg = str(info.value)
    assert "\n" not in msg and "TensorRT >= 10.9" in msg and "import tensorrt" in msg and "--backend torch" in msg
    from turbocompile.build import BuildOptions, build

    with pytest.raises(BackendUnavailableError, match="TensorRT >= 10.9"):
        build(BuildOptions(model="wan-tiny", out=tmp_path / "trt", backend="tensorrt"))
    assert not (tmp_path / "trt").exists()  # refused before building anything
    with pytest.raises(BackendUnavailableError, match="TensorRT >= 10.9"):
        open_engine(tmp_path, {"backend": "tensorrt", "target": "sm_90"})


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(BackendUnavailableError, match="unknown backend 'tvm'"):
        check_backend("tvm")
    with pytest.raises(BackendUnavailableError, match="unknown backend"):
        lower("tvm", tmp_path, {})


def test_prepare_for_tensorrt_marks_plugins(builds):
    import onnx

    from turbocompile.backends.tensorrt_build import prepare_for_tensorrt
    from turbocompile.plugins.tensorrt_plugins import AOT_OPS, JIT_OPS

    from turbocompile.backends.onnx_export import custom_nodes
    from turbocompile.plugins.onnx_schemas import SPLIT_OPS

    assert (AOT_OPS - set(SPLIT_OPS)) | JIT_OPS == set(OP_SPECS) and not AOT_OPS & JIT_OPS
    model = prepare_for_tensorrt(onnx.load(str(builds["accel"] / "experts/main/model.onnx")), AOT_OPS)
    register_schemas()
    onnx.checker.check_model(model, full_check=True)  # the attributes and split ops are declared in the schemas
    layers = SPEC.dit.num_layers
    nodes = custom_nodes(model)
    assert "int8_block_linear" not in nodes  # every int8-block linear became quantize + GEMM
    assert nodes["quant_int8_block"] == nodes["gemm_int8_block"] == 7 * layers  # q/k/v and context k/v fused
    ours = [n for n in model.graph.node if n.domain == DOMAIN]
    for node in ours:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["plugin_namespace"] == DOMAIN.encode()
        assert attrs["aot"] == (1 if node.op_type in AOT_OPS else 0)


def test_plugin_type_combinations():
    from turbocompile.plugins.tensorrt_plugins import type_combinations

    lin = type_combinations(OP_SPECS["int8_block_linear"])
    assert "BF16, INT8, FP32, BF16, BF16" in lin and "BF16, INT8, FP32, FP32, BF16" in lin
    assert all(len(c.split(", ")) == 5 for c in lin)
    assert type_combinations(OP_SPECS["fp8_row_linear"])[0] == "FP32, FP8, FP32, FP32, FP32"
    assert "BF16, FP32, FP32, BF16" in type_combinations(OP_SPECS["layernorm_modulate"])
    assert len(set(lin)) == len(lin)


_INTERPRET_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from turbocompile.kernels.norms import layer_norm_affine_ref, layernorm_modulate_ref, rms_norm_ref
    from turbocompile.plugins.tensorrt_plugins import norm_adapter, norm_launch
    g = torch.Generator().manual_seed(3)
    B, L, D = 2, 37, 96
    x = torch.randn(B, L, D, generator=g)
    shift, scale = torch.randn(B, 1, D, generator=g), torch.randn(B, 1, D, generator=g)
    w, b = torch.randn(D, generator=g), torch.randn(D, generator=g)
    rows, block_d, _ = norm_launch(D)
    grid = ((B * L + rows - 1) // rows,)
    cases = [("layernorm_modulate", (x, shift, scale), (B * L, L, D, D, 0, D, 0), True,
              layernorm_modulate_ref(x, shift, scale, 1e-6)),
             ("layer_norm_affine", (x, w, b), (B * L, L, D, 0, 0, 0, 0), False,
              layer_norm_affine_ref(x, w, b, 1e-6)),
             ("rms_norm", (x, w), (B * L, L, D, 0, 0), False, rms_norm_ref(x, w, 1e-6))]
    import math
    from turbocompile.kernels import linear_w8a8, quantize_activations as qa
    from turbocompile.plugins.tensorrt_plugins import gemm_config, gemm_int8_block_aot, quant_int8_block_aot
    M, K, N = 300, 256, 192
    xl = torch.randn(M, K, generator=g)
    q = torch.zeros(M, K, dtype=torch.int8)
    s = torch.full((math.ceil(M / 128), K // 128), float("nan"))
    quant_int8_block_aot[(s.shape[0], s.shape[1])](xl, M, K, s.shape[1], q, s, INTERP=True)
    q_ref, s_ref = qa.quant_int8_block_ref(xl)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    print("quant_int8_block 0")
    wq = linear_w8a8.quantize_weight(torch.randn(N, K, generator=g), "int8-block")
    bias = torch.randn(N, generator=g)
    y = torch.full((M, N), float("nan"))
    cfg = gemm_config()
    grid_g = (math.ceil(M / cfg.block_m) * math.ceil(N / cfg.block_n),)
    gemm_int8_block_aot[grid_g](q, s, wq["w_q"], wq["w_scale"], bias, M, N, K, s.shape[1], y, EVEN_K=True,
                                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
                                RESCALE=cfg.rescale, OUT_ROUND=0)
    err = (y - linear_w8a8.reference_linear(xl, wq["w_q"], wq["w_scale"], bias, "int8-block")).abs().max().item()
    assert torch.isfinite(y).all() and err < 1e-4, err
    print("gemm_int8_block", err)
    for op, tensors, ints, param_rows, ref in cases:
        kernel, flags = norm_adapter(op)
        out = torch.full_like(x, float("nan"))
        kernel[grid](*tensors, *ints, out, EPS=1e-6, PARAM_ROWS=param_rows, ROWS=rows, BLOCK_D=block_d, **flags)
        err = (out - ref).abs().max().item()
        assert torch.isfinite(out).all(), op
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (op, err)
        print(op, err)
""")


def test_aot_kernels_compute_the_reference():
    """The AOT kernels' argument order (inputs, int scalars, outputs) and strides, run by Triton's interpreter:
    the int8-block quantization is bit-identical to its reference, quantize + GEMM equals the linear's reference."""
    pytest.importorskip("triton")
    proc = subprocess.run([sys.executable, "-c", _INTERPRET_CHILD], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("\n") == 5


@pytest.mark.parametrize("op,params,n_ints", [("layernorm_modulate", ("FP32", "FP32"), 7),
                                              ("rms_norm", ("BF16",), 5)])
def test_aot_norm_kernels_compile_to_sm90a_ptx(op, params, n_ints):
    """What ``@trtp.aot_impl`` hands TensorRT, compiled here without a GPU."""
    import re

    pytest.importorskip("triton")
    from turbocompile.plugins.tensorrt_plugins import compile_norm

    kernel = compile_norm(op, "BF16", params, 5120, 1e-6, (9, 0))
    ptx = kernel.asm["ptx"]
    assert re.search(r"\.target sm_90a", ptx)
    start = ptx.index(f".entry {kernel.metadata.name}(")
    n_params = ptx.count(".param", start, ptx.index(")", start))
    # x + params, the int32 scalars, the output, then Triton's two hidden scratch pointers (see docs/tensorrt.md)
    assert n_params == 1 + len(params) + n_ints + 1 + 2
    assert kernel.metadata.num_warps * 32 <= 1024


@pytest.mark.parametrize("part,n_params", [("quant", 1 + 3 + 2), ("gemm", 5 + 4 + 1)])
def test_aot_linear_kernels_compile_to_sm90a_ptx(part, n_params):
    pytest.importorskip("triton")
    from turbocompile.plugins.tensorrt_plugins import compile_linear_split

    kernel = compile_linear_split(part, "BF16", 5120, (9, 0))
    ptx = kernel.asm["ptx"]
    assert ".target sm_90a" in ptx
    start = ptx.index(f".entry {kernel.metadata.name}(")
    assert ptx.count(".param", start, ptx.index(")", start)) == n_params + 2  # + Triton's two scratch pointers
    assert kernel.metadata.shared <= 48 * 1024  # no opt-in for more shared memory needed at launch


@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_plugins_register():
    from turbocompile.backends.tensorrt_build import check_tensorrt
    from turbocompile.plugins.tensorrt_plugins import register_plugins

    check_tensorrt()
    ids = register_plugins()
    assert ids == register_plugins() and len(ids) == len(OP_SPECS)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_round_trip_matches_pytorch(tmp_path):
    from turbocompile.build import BuildOptions, build
    from turbocompile.targets import local_target

    root = build(BuildOptions(model="wan-tiny", out=tmp_path / "trt", backend="tensorrt", gpu=local_target().name))
    manifest = _manifest(root)
    x, t, ctx = (v.cuda() for v in example_inputs(SPEC, 160, 96, 17, seed=99, dtype=torch.bfloat16))
    out = open_engine(root, manifest).expert("main")(x, t, ctx).float()
    with torch.no_grad():
        ref = random_dit(SPEC, seed=0, dtype=torch.bfloat16, device="cuda")(x, t, ctx, return_dict=False)[0].float()
    assert torch.isfinite(out).all() and _rel(out, ref) < 0.1


def test_linear_without_bias_exports_with_zero_bias(tmp_path):
    """The ONNX linear nodes always take a bias; a Linear without one gets zeros of its output width."""
    import onnx
    import onnxruntime as ort

    from turbocompile.backends.onnx_export import _translations, custom_nodes
    from turbocompile.backends.onnx_runtime import register_python_ops
    from turbocompile.kernels import linear_w8a8

    gen = torch.Generator().manual_seed(5)
    q = linear_w8a8.quantize_weight(torch.randn(192, 128, generator=gen), "int8-block")

    class NoBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w_q", q["w_q"])
            self.register_buffer("w_scale", q["w_scale"])

        def forward(self, x):
            return torch.ops.turbocompile.int8_block_linear(x, self.w_q, self.w_scale, None)

    x = torch.randn(1, 40, 128, generator=gen)
    register_schemas()
    prog = torch.onnx.export(NoBias().eval(), (x,), dynamo=True, custom_translation_table=_translations(),
                             input_names=["x"], verbose=False)
    prog.save(str(tmp_path / "nobias.onnx"))
    model = onnx.load(str(tmp_path / "nobias.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert custom_nodes(model) == {"int8_block_linear": 1}
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(register_python_ops())
    sess = ort.InferenceSession(str(tmp_path / "nobias.onnx"), opts, providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {"x": x.numpy()})
    ref = torch.ops.turbocompile.int8_block_linear(x, q["w_q"], q["w_scale"], None)
    assert out.shape == (1, 40, 192) and torch.equal(torch.from_numpy(out), ref)


def test_onnx_two_expert_model_round_trips(tmp_path):
    """wan-tiny-i2v: both experts are lowered, listed, hashed and each matches its own eager model."""
    from turbocompile.build import BuildOptions, build

    spec = get_model("wan-tiny-i2v")
    root = build(BuildOptions(model=spec.id, out=tmp_path / "i2v", backend="onnx", skip_passes=list(ACCEL)))
    manifest = _manifest(root)
    assert manifest["backend_files"] == {"high_noise": "experts/high_noise/model.onnx",
                                         "low_noise": "experts/low_noise/model.onnx"}
    assert all(f in manifest["files"] for f in manifest["backend_files"].values())
    engine = open_engine(root, manifest, "cpu")
    assert engine.expert_names == ("high_noise", "low_noise")
    x, t, ctx = example_inputs(spec, 160, 96, 17, seed=11)
    for i, name in enumerate(engine.expert_names):  # the build seeds expert i with seed + i
        with torch.no_grad():
            ref = random_dit(spec, seed=i)(x, t, ctx, return_dict=False)[0]
        assert _rel(engine.expert(name)(x, t, ctx), ref) < 1e-5, name


def test_onnx_export_of_a_gpu_build_is_valid_bf16_with_fp8_linears(tmp_path):
    """The file the TensorRT backend parses: wan-tiny built on this CPU for sm_90 (bf16, the sm_90 W8A8 scheme)."""
    import onnx

    from turbocompile.backends.onnx_export import ONNX_OPSET_LOW_PRECISION, custom_nodes
    from turbocompile.build import BuildOptions, build
    from turbocompile.kernels.linear_w8a8 import OP_NAMES, auto_scheme

    root = build(BuildOptions(model="wan-tiny", out=tmp_path / "sm90", backend="onnx", gpu="sm_90"))
    manifest = _manifest(root)
    assert manifest["dtype"] == "bfloat16"
    register_schemas()
    model = onnx.load(str(root / "experts/main/model.onnx"))
    onnx.checker.check_model(model, full_check=True)  # bf16 Conv etc. need opset 22
    assert {(o.domain, o.version) for o in model.opset_import} >= {("", ONNX_OPSET_LOW_PRECISION), (DOMAIN, 1)}
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    linear = OP_NAMES[auto_scheme("sm_90")]
    assert custom_nodes(model)[linear] == 7 * SPEC.dit.num_layers  # q/k/v and context k/v fused
    w_types = {t.data_type for t in model.graph.initializer}
    assert (onnx.TensorProto.FLOAT8E4M3FN if linear.startswith("fp8") else onnx.TensorProto.INT8) in w_types
    with pytest.raises(BackendUnavailableError, match="bfloat16") as info:  # not for onnxruntime's Python ops
        open_engine(root, manifest, "cpu")
    assert "\n" not in str(info.value) and "TensorRT" in str(info.value)


# ------------------------------------------------------------------------------------------------------------------
# The plugin definitions, exercised against a stand-in for tensorrt.plugin (NOT TensorRT: this only proves that the
# definitions run, that every op gets register/autotune/impl and the AOT ops an aot_impl, and what the aot_impl
# returns for the shapes of a Wan block; the stand-in's semantics are our reading of the API docs)
# ------------------------------------------------------------------------------------------------------------------
class _Expr(int):
    """A constant symbolic dimension."""

    is_constant = True

    @property
    def constant_value(self) -> int:
        return int(self)

    def __mul__(self, other):
        return _Expr(int(self) * int(other))

    __rmul__ = __mul__

    def __floordiv__(self, other):
        return _Expr(int(self) // int(other))


class _Desc:
    def __init__(self, shape, dtype):
        self.shape_expr = [_Expr(d) for d in shape]
        self.dtype = dtype

    @property
    def ndim(self):
        return len(self.shape_expr)

    def like(self):
        return _Desc(list(self.shape_expr), self.dtype)


def _fake_tensorrt():
    import types

    trt = types.ModuleType("tensorrt")
    trt.float32, trt.float16, trt.bfloat16, trt.int8 = "float32", "float16", "bfloat16", "int8"
    trt.__version__ = "10.9.0"
    trtp = types.ModuleType("tensorrt.plugin")
    registry: dict = {}

    def decorator(kind):
        def make(plugin_id):
            def record(fn):
                registry.setdefault(plugin_id, {})[kind] = fn
                return fn
            return record
        return make

    for kind in ("register", "autotune", "impl", "aot_impl"):
        setattr(trtp, kind, decorator(kind))

    class KernelLaunchParams:
        grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None

    class SymIntExprs(list):
        @classmethod
        def from_tuple(cls, items):
            return cls(items)

    trtp.TensorDesc, trtp.Tensor, trtp.SymExprs = _Desc, object, list
    trtp.KernelLaunchParams, trtp.SymIntExprs = KernelLaunchParams, SymIntExprs
    trtp.AutoTuneCombination = lambda io_types: io_types
    trtp.SymInt32 = lambda e: int(e)
    trtp.cdiv = lambda a, b: _Expr(-(-int(a) // int(b)))
    trtp.from_shape_expr = lambda dims, dtype: _Desc([int(d) for d in dims], dtype)
    trt.plugin = trtp
    return trt, trtp, registry


def test_plugin_definitions_against_a_stand_in_for_tensorrt_plugin(monkeypatch):
    pytest.importorskip("triton")
    from turbocompile.plugins import tensorrt_plugins as tp

    trt, trtp, registry = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(tp, "_REGISTERED", False)
    monkeypatch.setattr(tp, "_capability", lambda: (9, 0))
    ids = tp.register_plugins()
    from turbocompile.plugins.onnx_schemas import SPLIT_OPS

    assert sorted(ids) == sorted(f"{DOMAIN}::{n}" for n in (*OP_SPECS, *SPLIT_OPS)) and set(registry) == set(ids)
    for op in (*OP_SPECS, *SPLIT_OPS):
        kinds = set(registry[f"{DOMAIN}::{op}"])
        assert kinds == ({"register", "autotune", "impl", "aot_impl"} if op in tp.AOT_OPS
                         else {"register", "autotune", "impl"}), op

    # descriptors at Wan-block shapes (B=1, L=300 tokens, D=256, 2 heads of 128)
    x = _Desc([1, 300, 256], "bfloat16")
    w_q = _Desc([512, 256], "int8")
    lin = registry[f"{DOMAIN}::int8_block_linear"]
    out = lin["register"](x, w_q, _Desc([4, 2], "float32"), _Desc([512], "bfloat16"))
    assert [int(d) for d in out.shape_expr] == [1, 300, 512] and out.dtype == "bfloat16"
    assert lin["autotune"](x, w_q, None, None, None) == tp.type_combinations(OP_SPECS["int8_block_linear"])
    q = _Desc([1, 2, 300, 128], "bfloat16")
    sla = registry[f"{DOMAIN}::sage_sla"]["register"](q, q, q, _Desc([128, 128], "bfloat16"), _Desc([128], "bfloat16"),
                                                      0.1, 64, 128)
    assert [int(d) for d in sla.shape_expr] == [1, 2, 300, 128]

    # the AOT implementation of layernorm_modulate: PTX for sm_90a, launch over the 300 rows, int32 extras
    shift = _Desc([1, 1, 256], "float32")
    eps = __import__("numpy").array([1e-6], dtype="float32")
    name, ptx, launch, extras = registry[f"{DOMAIN}::layernorm_modulate"]["aot_impl"](x, shift, shift, eps, (x,), 0)
    rows, _, warps = tp.norm_launch(256)
    assert isinstance(name, bytes) and b".target sm_90a" in ptx and name in ptx
    assert launch.grid_x == -(-300 // rows) and launch.block_x == warps * 32 and launch.shared_mem is not None
    assert list(extras) == [300, 300, 256, 0, 0, 0, 0]  # R, L, D, then (batch, token) strides of shift and scale
    per_token = _Desc([2, 300, 256], "float32")  # parameters that vary per token: strides L*D and D
    x2 = _Desc([2, 300, 256], "bfloat16")
    *_, extras = registry[f"{DOMAIN}::layernorm_modulate"]["aot_impl"](x2, per_token, per_token, eps, (x2,), 0)
    assert list(extras) == [600, 300, 256, 300 * 256, 256, 300 * 256, 256]
    *_, extras = registry[f"{DOMAIN}::rms_norm"]["aot_impl"](x, _Desc([256], "bfloat16"), eps, (x,), 0)
    assert list(extras) == [300, 300, 256, 0, 0]

    # the split int8-block linear: quantize (2-D grid over 128x128 tiles), then the GEMM (1-D grid over output tiles)
    quant = registry[f"{DOMAIN}::quant_int8_block"]
    x_q, x_scale = quant["register"](x)
    assert (x_q.dtype, [int(d) for d in x_q.shape_expr]) == ("int8", [1, 300, 256])
    assert (x_scale.dtype, [int(d) for d in x_scale.shape_expr]) == ("float32", [3, 2])
    name, ptx, launch, extras = quant["aot_impl"](x, (x_q, x_scale), 0)
    assert b".target sm_90a" in ptx and (launch.grid_x, launch.grid_y) == (3, 2) and list(extras) == [300, 256, 2]
    gemm = registry[f"{DOMAIN}::gemm_int8_block"]
    bias = _Desc([512], "bfloat16")
    y = gemm["register"](x_q, x_scale, w_q, _Desc([4, 2], "float32"), bias)
    assert (y.dtype, [int(d) for d in y.shape_expr]) == ("bfloat16", [1, 300, 512])
    name, ptx, launch, extras = gemm["aot_impl"](x_q, x_scale, w_q, _Desc([4, 2], "float32"), bias, (y,), 0)
    cfg = tp.gemm_config()
    assert launch.grid_x == -(-300 // cfg.block_m) * -(-512 // cfg.block_n) and list(extras) == [300, 512, 256, 2]


def test_onnx_engine_drives_the_rcm_sampler(builds):
    """The lowered engine inside the sampler loop: 4 rCM steps match the eager engine's (clean-up passes only)."""
    from turbocompile.engine import EagerEngine
    from turbocompile.sampling import sample_rcm

    root = builds["plain"]
    onnx_engine = open_engine(root, _manifest(root), "cpu")
    eager = EagerEngine(SPEC, {"main": random_dit(SPEC, seed=0)}, 160, 96, 17)
    ctx = torch.randn(1, SPEC.text_len, SPEC.dit.text_dim, generator=torch.Generator().manual_seed(21))
    with torch.no_grad():
        got = sample_rcm(onnx_engine, ctx, steps=4, seed=3)
        want = sample_rcm(eager, ctx, steps=4, seed=3)
    assert got.shape == want.shape and torch.isfinite(got).all()
    assert _rel(got, want) < 1e-4


def test_tensorrt_engine_metadata_refuses_another_tensorrt(tmp_path):
    from turbocompile.backends.tensorrt_runtime import _check_engine_meta

    meta = tmp_path / "model.engine.json"
    meta.write_text(json.dumps({"tensorrt": "10.15.1", "arch": "sm_90", "gpu": "NVIDIA H100"}))
    with pytest.raises(ArtifactError, match=r"built with TensorRT 10\.15\.1, this is TensorRT 10\.16\.1"):
        _check_engine_meta(meta, "10.16.1")
    if not torch.cuda.is_available():
        _check_engine_meta(meta, "10.15.1")  # same version; no GPU here to compare architectures


def _register_split_python_ops() -> None:
    """onnxruntime Python ops for the two halves of the split int8-block linear (test-only references)."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from turbocompile.kernels.quantize_activations import quant_int8_block_ref

    if getattr(_register_split_python_ops, "done", False):
        return

    @onnx_op(op_type=f"{DOMAIN}::quant_int8_block", inputs=[PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_int8, PyCustomOpDef.dt_float])
    def _quant(x):
        q, s = quant_int8_block_ref(torch.from_numpy(x))
        return q.reshape(x.shape).numpy(), s.numpy()

    @onnx_op(op_type=f"{DOMAIN}::gemm_int8_block", inputs=[PyCustomOpDef.dt_int8, PyCustomOpDef.dt_float,
                                                           PyCustomOpDef.dt_int8, PyCustomOpDef.dt_float,
                                                           PyCustomOpDef.dt_float],
             outputs=[PyCustomOpDef.dt_float])
    def _gemm(x_q, x_scale, w_q, w_scale, bias):
        a = torch.from_numpy(x_q).reshape(-1, x_q.shape[-1]).double()
        sa, b, sb = torch.from_numpy(x_scale).double(), torch.from_numpy(w_q).double(), torch.from_numpy(w_scale)
        rows_a = torch.arange(a.shape[0]) // 128
        rows_b = torch.arange(b.shape[0]) // 128
        out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
        for kb in range(sa.shape[1]):
            ks = slice(kb * 128, (kb + 1) * 128)
            out += (a[:, ks] @ b[:, ks].t()) * sa[rows_a, kb][:, None] * sb.double()[rows_b, kb][None, :]
        y = out.float() + torch.from_numpy(bias)
        return y.reshape(*x_q.shape[:-1], b.shape[0]).numpy()

    _register_split_python_ops.done = True


def test_split_int8_block_linears_compute_the_same_in_onnxruntime(builds, probe, tmp_path):
    """The graph TensorRT parses (linears split into quantize + GEMM, TensorRT attributes set) runs in onnxruntime
    and matches the unsplit graph: the rewrite wires the halves correctly."""
    import onnx

    from turbocompile.backends.onnx_runtime import OnnxExpert
    from turbocompile.backends.tensorrt_build import prepare_for_tensorrt
    from turbocompile.plugins.tensorrt_plugins import AOT_OPS

    pytest.importorskip("onnxruntime_extensions")
    _register_split_python_ops()
    src = builds["accel"] / "experts/main/model.onnx"
    model = prepare_for_tensorrt(onnx.load(str(src)), AOT_OPS)
    onnx.save(model, str(tmp_path / "split.onnx"))
    x, t, ctx, _ = probe
    whole = OnnxExpert(src)(x, t, ctx)
    split = OnnxExpert(tmp_path / "split.onnx")(x, t, ctx)
    # float64 vs float32 sums flip a few int8 roundings downstream (as ONNX vs torch does); miswiring would be O(1)
    assert torch.isfinite(split).all() and _rel(split, whole) < 0.01
