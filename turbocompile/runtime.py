"""``turbocompile.load(DIR)``: the artifact's programs as an :class:`~turbocompile.engine.Engine`.

Loading checks the manifest (schema, sha256 of program and weight files, target GPU) before anything
else, then binds each expert's weights (safetensors, straight to the device) to its exported program.
No model code is imported: only the graph, the weights and the ``torch.ops.turbocompile`` kernels.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import torch

from . import artifact
from .engine import Engine, ResidentEngine
from .errors import ArtifactError, InputError
from .targets import check_runnable
from .zoo import get_model

log = logging.getLogger(__name__)

class ExpertProgram:
    """One expert: an exported program plus its weights, callable as ``f(x, t, context)``."""

    def __init__(self, folder: Path, info: dict[str, Any], compile_mode: str | None):
        from safetensors import safe_open

        try:
            ep = torch.export.load(str(folder / "program.pt2"))
        except Exception as exc:  # noqa: BLE001 - report what a user can act on
            raise ArtifactError(f"cannot load {folder / 'program.pt2'} ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}); rebuild the artifact") from exc
        self.module = ep.module()
        with safe_open(str(folder / "weights.safetensors"), framework="pt", device="cpu") as f:
            self.weights = [f.get_tensor(n) for n in info["weight_order"]]
        self.on_device = False
        self._compiled = None
        self.compile_mode = compile_mode
        self._swapping = False  # set by keep_host_copy(): the engine moves this expert in and out
        self._host: list[torch.Tensor] | None = None  # the host weights while the device holds a copy
        self._dense: ExpertProgram | None = None
        self._parent: ExpertProgram | None = None  # set on a dense() view: weights and residency live there

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights)

    def dense(self) -> "ExpertProgram":
        """A view of this expert (same weights, same residency) whose ``sage_sla`` / ``sla`` self-attention
        nodes are dense ``sage_attention``: the program a ``--dense-steps`` step runs."""
        if self._dense is None:
            view = copy.copy(self)
            view.module = dense_attention_module(self.module)
            view._compiled, view._dense, view._parent = None, None, self
            self._dense = view
        return self._dense

    def keep_host_copy(self) -> None:
        """Called by an engine that swaps this expert in and out: keep the host weights, pinned, while the device
        holds a copy. Moving out is then dropping the device copy (the weights never change at inference, so
        nothing is copied back) and moving in is one asynchronous copy from pinned memory; before, each swap
        copied 14.6 GB back to the host and in again from pageable memory (A14B under 32 GiB)."""
        self._swapping = True

    def to(self, device: torch.device, non_blocking: bool = False) -> None:
        if self._parent is not None:
            self._parent.to(device, non_blocking)
            return
        if device.type == "cpu" and self._host is not None:
            self.weights, self._host = self._host, None
        else:
            host = self.weights if self.weights and self.weights[0].device.type == "cpu" else None
            if host is not None and device.type == "cuda" and (non_blocking or self._swapping):
                host = _pinned(host)
                self.weights, non_blocking = host, True
            self.weights = [t.to(device, non_blocking=non_blocking) for t in self.weights]
            if host is not None and self._swapping and device.type != "cpu":
                self._host = host
        self.on_device = device.type != "cpu"
        if self._dense is not None:  # the dense view must not keep the weights it last ran with alive
            self._dense.weights = self.weights

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self._parent is not None:
            self.weights = self._parent.weights  # the parent may have moved them since the view was made
        fn = self.module
        graphs = self.compile_mode == "reduce-overhead"
        if self.compile_mode is not None:
            if self._compiled is None:
                if graphs:
                    mark_weights_static(self.weights)
                self._compiled = torch.compile(self.module, fullgraph=True,
                                               mode=None if self.compile_mode == "default" else self.compile_mode)
            fn = self._compiled
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        out = fn(*self.weights, x, t, context)
        out = out[0] if isinstance(out, (tuple, list)) else out
        # a replay writes the next output into the same buffer: hand the sampler its own copy (one latent)
        return out.clone() if graphs else out


def _pinned(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` in page-locked host memory (pinned once: already pinned tensors are returned as they are), or as
    they are where pinning fails (a host without the room or the permission: the copies are then synchronous and
    slower). One buffer for all of them: PyTorch's pinned allocator rounds every allocation up to a power of two,
    which per tensor would cost a 14B expert ~1.4x its 14.6 GB (a 70.8 MB FFN weight takes 128 MB)."""
    if all(t.is_pinned() for t in tensors):
        return tensors
    try:
        return _views_of_one_buffer(tensors, lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
    except RuntimeError as exc:
        log.warning("cannot pin %.1f GiB of expert weights (%s); copying from pageable memory",
                    sum(t.numel() * t.element_size() for t in tensors) / 2**30, str(exc).splitlines()[0])
        return tensors


def _views_of_one_buffer(tensors: list[torch.Tensor], alloc) -> list[torch.Tensor]:
    """Copies of ``tensors`` laid out in one byte buffer from ``alloc(nbytes)`` (each at a 64-byte aligned offset),
    as views of their own dtype and shape."""
    align = 64
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // align) * align
    flat = alloc(max(total, 1))
    out = []
    for t, off, n in zip(tensors, offsets, sizes):
        view = flat[off:off + n].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    return out


def mark_weights_static(weights: list[torch.Tensor]) -> None:
    """Mark a program's weights, which are graph inputs, as static addresses before compiling it with
    ``mode="reduce-overhead"``: a CUDA-graph replay then reads them in place instead of first copying every weight
    into the graph's own input buffers (twice the memory, and 1-4% of a 1.3B forward's time)."""
    for w in weights:
        torch._dynamo.mark_static_address(w)


def dense_attention_module(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of an exported program's module in which each ``sage_sla`` / ``sla`` call (block-sparse + linear
    attention) is the dense ``sage_attention`` over the same q, k, v and blocks; the now unused SLA
    projection inputs stay as placeholders, so the call signature (all weights first) does not change."""
    ops = torch.ops.turbocompile
    sparse = {ops.sage_sla.default, ops.sla.default}
    gm = copy.deepcopy(module)
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in sparse:
            q, k, v, _w, _b, _topk, blk_q, blk_k = node.args[:8]
            with gm.graph.inserting_before(node):
                dense = gm.graph.call_function(ops.sage_attention.default, (q, k, v, blk_q, blk_k))
            dense.meta = dict(node.meta)
            node.replace_all_uses_with(dense)
            gm.graph.erase_node(node)
            n += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    log.info("dense variant: %d sparse attention calls -> sage_attention", n)
    return gm


class ProgramEngine(ResidentEngine):
    """The built artifact as an engine (see :class:`turbocompile.engine.Engine`)."""

    def __init__(self, root: Path, manifest: dict[str, Any], device: torch.device,
                 gpu_memory_budget: int | None = None, compile_mode: str | None = None):
        self.root, self.manifest = root, manifest
        shapes = manifest["shapes"]
        experts = {name: ExpertProgram(root / "experts" / name, manifest["expert_info"][name], compile_mode)
                   for name in manifest["experts"]}
        super().__init__(get_model(manifest["model"]), shapes["width"], shapes["height"], shapes["frames"], device,
                         artifact.DTYPES[manifest["dtype"]], experts, gpu_memory_budget,
                         dynamic_frames=bool(shapes.get("dynamic_frames")))


def _why_no_cuda_graphs(backend: str, dev: torch.device, manifest: dict) -> str | None:
    """Why this artifact on this device cannot replay CUDA graphs (the error for an explicit request), or None.
    Whether every expert stays resident is known only once the engine exists (:func:`load` checks it then)."""
    if backend != "torch":
        return f"--cuda-graphs applies to the torch backend; this artifact was lowered to {backend} (drop the flag)"
    if dev.type != "cuda":
        return "--cuda-graphs needs a CUDA device; drop the flag on this machine"
    if manifest["shapes"].get("dynamic_frames"):
        return ("--cuda-graphs needs a static-shape artifact; this one was built with --dynamic-frames (rebuild "
                "without it, or drop --cuda-graphs)")
    return None


def load(path: str | Path, *, device: str | torch.device | None = None, verify_hashes: bool = True,
         gpu_memory_budget: int | None = None, compile: bool | None = None,
         cuda_graphs: bool | None = None) -> "Engine":
    """Open an artifact directory for sampling. Refuses a tampered file, another schema, or another GPU arch.

    ``compile``: run the programs through ``torch.compile`` (the ``torch`` backend; default on CUDA for
    artifacts built with it); ``eager`` artifacts and CPU runs execute the exported graph directly.
    ``cuda_graphs``: compile with ``mode="reduce-overhead"`` so each forward replays as one CUDA graph. Only for
    a compiled static-shape artifact on CUDA whose experts all stay resident (a swapped-in expert's weights land
    at new addresses). None (default): on wherever that holds, off elsewhere — the compiled 1.3B@480p forward is
    host-bound without graphs (0.18-0.28 s from one process to the next for 0.16-0.18 s of GPU work; 0.180 s with
    them, docs/performance.md). True: required, refused with the reason where it cannot work. False: off.
    """
    root = Path(path)
    manifest = artifact.read_manifest(root, verify_hashes=verify_hashes)
    import turbocompile.kernels as kernels

    kernels.load_ops()
    dev = torch.device(device) if device is not None else check_runnable(manifest["target"])
    if device is not None and dev.type == "cuda":
        check_runnable(manifest["target"])
    backend = manifest.get("backend", "torch")
    why_no_graphs = _why_no_cuda_graphs(backend, dev, manifest)
    auto_graphs = cuda_graphs is None
    if auto_graphs:
        cuda_graphs = why_no_graphs is None and compile is not False
    elif cuda_graphs and why_no_graphs is not None:
        raise InputError(why_no_graphs)
    if backend in ("onnx", "aoti", "tensorrt"):
        from .backends import open_engine

        return open_engine(root, manifest, dev)
    if compile is None:
        compile = backend == "torch" and dev.type == "cuda"
    mode = "default" if compile else None
    if cuda_graphs:
        mode = "reduce-overhead"
    engine = ProgramEngine(root, manifest, dev, gpu_memory_budget, mode)
    if cuda_graphs and not engine.all_resident and auto_graphs:
        log.info("CUDA graphs off: the experts do not all stay resident under the memory budget (swapped in, "
                 "their weights move)")
        for expert in engine.expert_programs():
            expert.compile_mode = "default"
    elif cuda_graphs and not engine.all_resident:
        raise InputError("--cuda-graphs needs every expert resident on the GPU, and they do not all fit "
                         f"--gpu-memory-budget {gpu_memory_budget / 2**30:.1f}GiB; raise the budget or drop "
                         "--cuda-graphs")
    return engine
