"""Complete models: pydl.models against the same architecture in timm, eager and under torch.compile.

Ops: one per model and use. ``convnext_tiny`` / ``resnet50``: inference (mode fwd: eval mode, no
autograd graph). ``convnext_tiny.train`` / ``resnet50.train``: a training step's forward + backward
(mode fwd+bwd: train mode — BN batch statistics —, gradients of the image and of every parameter;
the optimizer step, identical for both, is left out). A shape is {B, S, cl}: a (B, 3, S, S) image,
channels_last inputs and 4-D weights when cl = 1, NCHW when cl = 0 (timm's default layout).
``--shapes`` takes "B=..,S=..,cl=..".
CPU: inference only (a training step of a 25M-parameter net at batch 8 takes tens of seconds on 2
cores), batch 8 at 224², both layouts, float32; --quick the same. CUDA: batch 64 at 224²,
channels_last, bfloat16 autocast (fp32 master weights), inference and training; the full run adds
NCHW. Train ops have no CPU shapes: their rows are declared for the GPU.

Providers (all get the same random weights, as inputs: ``torch.func.functional_call`` binds them):
  pydl           pydl.models.create(name) (pydl's kernels, channels_last inside)
  torch-eager    timm.create_model(name) eager, in the shape's layout (the reference provider)
  torch-compile  the timm model under torch.compile (CUDA only: compiling on 2 CPU cores takes minutes)
  pydl-compile   the pydl model under torch.compile (CUDA only)
low-precision dtypes run as autocast in that dtype (inputs in it, weights float32).
Work: FLOPs of one call, the forward counted by ``torch.utils.flop_counter`` on the meta device
(×3 for the train ops); reported as TFLOP/s; the report adds images/s.

Targets (``report``): CPU ConvNeXt-T inference, batch 8, 224², float32, NCHW input (what timm users
pass): pydl >= 1.0x timm eager. GPU (H100/H200): ConvNeXt-T training step, batch 64, bf16,
channels_last: >= 1.3x timm eager and >= 1.0x timm under torch.compile.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable

import torch

from ..core import COMPILED, EAGER, PYDL, REFERENCE, THROUGHPUT, Provider, Suite
from ..report import flag_note, measured, speedup, verdict

NAME = "models"
TRAIN = ".train"
MODELS = ("convnext_tiny", "resnet50")  # pydl registry name == timm name
OPS = MODELS + tuple(m + TRAIN for m in MODELS)
KEYS = ("B", "S", "cl")
CPU_TARGET = {"B": 8, "S": 224, "cl": 0}
GPU_TARGET = {"B": 64, "S": 224, "cl": 1}
NUM_CLASSES = 1000
LOW = (torch.float16, torch.bfloat16)


def shape(b: int, s: int = 224, cl: int = 1) -> dict:
    return {"B": b, "S": s, "cl": cl}


def dims(sh) -> tuple:
    """(B, S, cl) of a shape dict, tuple or "B=..,S=..,cl=.." string."""
    if isinstance(sh, str):
        sh = dict(p.split("=") for p in sh.split(","))
    if isinstance(sh, dict):
        sh = tuple(sh.get(k, 1 if k == "cl" else None) for k in KEYS)
    if len(sh) != 3 or None in sh:
        raise ValueError(f"models shapes are B=..,S=..[,cl=0|1], got {sh!r}")
    return tuple(int(x) for x in sh)


def base(op: str) -> str:
    return op[: -len(TRAIN)] if op.endswith(TRAIN) else op


def is_train(op: str) -> bool:
    return op.endswith(TRAIN)


def default_shapes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        layouts = (1,) if quick else (1, 0)
        rows = [shape(64, 224, cl) for cl in layouts]
        return {op: list(rows) for op in OPS}
    rows = [shape(8, 224, 0), shape(8, 224, 1)]
    return {op: ([] if is_train(op) else list(rows)) for op in OPS}


def modes(op: str) -> tuple:
    return ("fwd+bwd",) if is_train(op) else ("fwd",)


# ------------------------------------------------------------------------------- models

def _timm():
    from pydl.models._timm import import_timm  # lazily: the harness runs without timm

    return import_timm()


def _meta_model(which: str, name: str) -> torch.nn.Module:
    """The model with no storage (instant): its parameters come in as inputs."""
    with torch.device("meta"):
        if which == "pydl":
            import pydl.models

            return pydl.models.create(name, num_classes=NUM_CLASSES)
        return _timm().create_model(name, pretrained=False, num_classes=NUM_CLASSES)


def _materialise(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Storage on ``device``; BN running stats reset (the parameters are bound per call)."""
    model = model.to_empty(device=device)
    for m in model.modules():
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return model


@functools.lru_cache(maxsize=None)
def param_names(name: str) -> tuple:
    return tuple(n for n, _ in _meta_model("pydl", name).named_parameters())


def make_inputs(op: str, sh, dtype: torch.dtype, device: torch.device, seed: int):
    """(x, *parameters), (dlogits,) for train ops else (). x (B, 3, S, S) in ``dtype``; parameters
    float32, random (``pydl.models._common.randomize_``), 4-D ones channels_last when cl = 1."""
    from pydl.models._common import randomize_

    b, s, cl = dims(sh)
    g = torch.Generator().manual_seed(seed)
    model = randomize_(_materialise(_meta_model("pydl", base(op)), torch.device("cpu")), g)
    fmt = torch.channels_last if cl else torch.contiguous_format
    params = [p.detach().to(device).contiguous(memory_format=fmt if p.dim() == 4 else torch.contiguous_format)
              for p in model.parameters()]
    x = torch.randn(b, 3, s, s, generator=g).to(device=device, dtype=dtype).contiguous(memory_format=fmt)
    grads = (torch.randn(b, NUM_CLASSES, generator=g).to(device=device, dtype=dtype),) if is_train(op) else ()
    return (x, *params), grads


def model_fn(op: str, which: str, compiled: bool = False) -> Callable:
    """fn(x, *params) -> (logits,): the ``which`` ("pydl" | "timm") model with those parameters;
    train mode when the inputs require grad (the fwd+bwd rows), else eval under no_grad."""
    name = base(op)
    names = param_names(name)
    meta = _meta_model(which, name)
    state = {}

    def call(x, params):
        return torch.func.functional_call(state["mod"], params, (x,))

    run = call
    if compiled:
        torch._dynamo.reset()
        run = torch.compile(call, dynamic=False)

    def fn(x, *params):
        if "mod" not in state:
            state["mod"] = _materialise(meta, x.device)
        mod = state["mod"]
        training = x.requires_grad or any(p.requires_grad for p in params)
        if mod.training != training:
            mod.train(training)
        amp = (torch.autocast(x.device.type, dtype=x.dtype) if x.dtype in LOW else contextlib.nullcontext())
        with amp, (contextlib.nullcontext() if training else torch.no_grad()):
            return (run(x, dict(zip(names, params))),)
    return fn


@functools.lru_cache(maxsize=None)
def flops_per_image(name: str, s: int) -> int:
    """Forward FLOPs of one (3, s, s) image (2 per multiply-add), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _meta_model("timm", name).eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(torch.empty(1, 3, s, s, device="meta"))
    return int(fc.get_total_flops())


def work(op: str, mode: str, sh, dtype) -> int:
    """FLOPs of one call: B images forward; a training step counts 3× (the backward's data and
    weight gradients are one forward each). Not counted by FlopCounterMode through the backward:
    torch 2.13 counts a grouped (depthwise) convolution's backward as a dense one (96× too many
    for ConvNeXt's 7×7 layers)."""
    b, s, _ = dims(sh)
    return b * flops_per_image(base(op), s) * (3 if is_train(op) else 1)


def grad_names(op: str) -> tuple:
    return ("dx",) + tuple("d" + n for n in param_names(base(op))) if is_train(op) else ()


def tolerances(dtype: torch.dtype) -> tuple:
    """(relative-norm floor, atol, rtol): whole networks, 50+ layers deep; train-mode BN over a
    small batch is badly conditioned (fp32 runs differ by ~1e-3 in the gradients)."""
    if dtype in (torch.float32, torch.float64):
        return 2e-3, 1e-3, 1e-2
    return 5e-2, 1 / 8, 1 / 8


# --------------------------------------------------------------------------------- targets


def _ms(r) -> str:
    return f"{float(r['p50_ms']):.0f} ms" if measured(r) else "—"


def _ips(r, b: int) -> str:
    return f"{b / (float(r['p50_ms']) * 1e-3):.1f}" if measured(r) else "—"




def report(rows: list) -> list:
    """Markdown: every cell's images/s (pydl vs timm), then the targets."""
    by = {}
    for r in rows:
        if r.get("suite") == NAME:
            by.setdefault((r["device"], r["op"], r["mode"], r["shape"], r["dtype"]), {})[r["provider"]] = r
    lines = ["## Models (images/s)", "",
             "| device | model | mode | cell | dtype | pydl | timm eager | timm compile | pydl compile | "
             "pydl / timm eager |", "|---|---|---|---|---|---|---|---|---|---|"]
    for (dev, op, mode, shp, dtype), per in sorted(by.items()):
        b = dims(shp)[0]
        p, e = per.get("pydl"), per.get(EAGER)
        sp = speedup(p, e)
        lines.append(f"| {dev} | {op} | {mode} | {shp} | {dtype} | {_ips(p, b)} | {_ips(e, b)} | "
                     f"{_ips(per.get('torch-compile'), b)} | {_ips(per.get('pydl-compile'), b)} | "
                     f"{f'{sp:.2f}×' if sp else '—'}{flag_note([r for r in (p, e) if r])} |")
    lines += ["", "## Models targets", "", "| target | cell | pydl | baseline | speed-up | verdict |",
              "|---|---|---|---|---|---|"]
    cpu = by.get(("cpu", "convnext_tiny", "fwd", ",".join(f"{k}={v}" for k, v in CPU_TARGET.items()), "float32"), {})
    p, e = cpu.get("pydl"), cpu.get(EAGER)
    sp = speedup(p, e)
    lines.append(f"| CPU ConvNeXt-T inference ≥ 1.0× timm eager | B=8 224² NCHW float32 | {_ms(p)} | {_ms(e)} | "
                 f"{f'{sp:.2f}×' if sp else '—'} | {verdict(None if sp is None else sp >= 1.0)}"
                 f"{' (no such cell in this run)' if not cpu else ''} |")
    gpu_shape = ",".join(f"{k}={v}" for k, v in GPU_TARGET.items())
    gpu = by.get(("cuda", "convnext_tiny" + TRAIN, "fwd+bwd", gpu_shape, "bfloat16"), {})
    p = gpu.get("pydl")
    for base_name, need in ((EAGER, 1.3), ("torch-compile", 1.0)):
        b_r = gpu.get(base_name)
        sp = speedup(p, b_r)
        lines.append(f"| GPU ConvNeXt-T training step ≥ {need}× timm {'eager' if base_name == EAGER else 'compile'} "
                     f"| B=64 224² channels_last bf16 | {_ms(p)} | {_ms(b_r)} | {f'{sp:.2f}×' if sp else '—'} | "
                     f"{verdict(None if sp is None else sp >= need)}"
                     f"{' (no CUDA cell in this run)' if not gpu else ''} |")
    return lines + [""]


SUITE = Suite(
    name=NAME,
    ops=OPS,
    providers=(
        Provider("pydl", lambda op: model_fn(op, "pydl"), PYDL),
        Provider(EAGER, lambda op: model_fn(op, "timm"), REFERENCE),
        Provider("torch-compile", lambda op: model_fn(op, "timm", compiled=True), COMPILED, devices=("cuda",)),
        Provider("pydl-compile", lambda op: model_fn(op, "pydl", compiled=True), COMPILED, devices=("cuda",)),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes={op: [shape(2, 32, 1)] for op in OPS},
    probe_shape=shape(1, 32, 1),
    work=lambda *a: work(*a),
    metric=THROUGHPUT,
    modes=lambda op: modes(op),
    out_names=("logits",),
    grad_names=lambda op: grad_names(op),
    diff_inputs=None,
    tolerances=lambda dtype: tolerances(dtype),
    dtypes=lambda device: [torch.bfloat16 if device.type == "cuda" else torch.float32],
    timing=dict(budget_s=3.0, min_reps=7, max_reps=200, warmup_s=0.0, min_warmup=2, rounds=7),
    plot_x=lambda s: dims(s)[0],
    x_label="B (images per call)",
    plot_series=lambda s: f"S={dims(s)[1]} cl={dims(s)[2]}",
    report=lambda rows: report(rows),
)
