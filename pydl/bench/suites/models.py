"""Complete models: pydl.models, and timm / Hugging Face models patched with ``pydl.patch``, against
the same architecture in timm / transformers, eager and under torch.compile.

Ops: one per model and use. Inference (mode fwd: eval mode, no autograd graph): ``convnext_tiny``,
``resnet50``, ``vit_small_patch16_224`` (timm ViT-S/16; no pydl.models model) and ``gpt2`` (GPT-2
small, 124M: the logits of (B, T) token ids). ``<model>.train``: a training step's forward + backward
(mode fwd+bwd: train mode — BN batch statistics; GPT-2 with dropout 0 so the gate can compare —,
gradients of every parameter, and of the image for the vision models, from a random upstream
gradient of the logits; the optimizer step, identical for all, is left out).
Shapes: vision {B, S, cl}: a (B, 3, S, S) image, channels_last inputs and 4-D weights when cl = 1,
NCHW when cl = 0 (timm's default layout) — see ``_models_vision``; GPT-2 {B, T, L, D}: B sequences
of T tokens, L layers of width D (default 12, 768: GPT-2 small) — see ``_models_lm``. ``--shapes``
takes BxSxCL for the vision ops, BxTxLxD for gpt2 (with ``--ops``).
CPU (float32): vision inference at batch 8, 224², NCHW; GPT-2 small at B=1, T=64, inference and
training step; the full run adds channels_last for ConvNeXt-T and ResNet-50 and GPT-2 at T=128.
Left out to keep ``--quick`` within ~6 minutes on 2 cores (about 2-3 on an idle one): vision training
steps (one of a 25M-parameter net at batch 8 takes tens of seconds there), channels_last cells and
T=128. CUDA (bfloat16 autocast, fp32 master weights): vision batch 64 at 224², channels_last (the
full run adds NCHW), GPT-2 small at B=8, T=1024; inference and training.

Providers (all get the same random weights, as inputs: ``torch.func.functional_call`` binds them):
  pydl           pydl.models.create(name) (pydl's kernels; ViT: none, skipped)
  torch-eager    timm.create_model(name) / transformers' GPT2LMHeadModel with attn_implementation
                 "sdpa", eager (the reference provider)
  patched        that reference model after ``pydl.patch(model)`` (in place: pydl's LayerNorms,
                 convolutions and attention in timm's / HF's own model), eager
  torch-compile  the reference model under torch.compile (CUDA only: compiling on 2 CPU cores takes minutes)
  pydl-compile   the pydl model under torch.compile (CUDA only)
Low-precision dtypes run as autocast in that dtype (weights float32).
Work: FLOPs of one call — vision: the forward counted by ``torch.utils.flop_counter`` on the meta
device; GPT-2: 2 per multiply-add of its matmuls plus full T×T attention — ×3 for the train ops;
reported as TFLOP/s; the report adds images/s or tokens/s.

Targets (``report``):
  CPU, ConvNeXt-T inference, batch 8, 224², float32, NCHW input (what timm users pass):
    pydl >= 1.0x timm eager; patched timm >= 1.0x unpatched (issue 16).
  GPU (H100/H200), bf16: ConvNeXt-T training step, batch 64, channels_last: pydl >= 1.3x timm eager
    and >= 1.0x timm under torch.compile; patched timm >= 1.2x unpatched (issue 16).
    GPT-2-small training step, B=8, T=1024: pydl >= 1.1x HF SDPA eager (issue 15); patched HF >= 1.1x
    its SDPA implementation (issue 16).
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..core import COMPILED, EAGER, PYDL, REFERENCE, THROUGHPUT, Provider, Suite, compile_fn, shape_str
from ..report import cells_by, flag_note, measured, speedup, target_row
from . import _models_lm as lm
from . import _models_vision as vision

NAME = "models"
TRAIN = ".train"
VISION = ("convnext_tiny", "resnet50", "vit_small_patch16_224")  # timm names
LM = ("gpt2",)
PYDL_MODELS = ("convnext_tiny", "resnet50", "gpt2")  # pydl.models registry names (== timm's)
MODELS = VISION + LM
OPS = MODELS + tuple(m + TRAIN for m in MODELS)
PATCHED = "patched"
CPU_TARGET = vision.shape(8, 224, 0)
GPU_TARGET = vision.shape(64, 224, 1)
LM_GPU_TARGET = lm.shape(8, 1024)
PROBE = {"B": 1, "S": 32, "cl": 1, "T": 8, "L": 1, "D": 64}  # a tiny shape of either family
LOW = (torch.float16, torch.bfloat16)


def base(op: str) -> str:
    return op[: -len(TRAIN)] if op.endswith(TRAIN) else op


def is_train(op: str) -> bool:
    return op.endswith(TRAIN)


def family(op: str):
    """The module that knows the op's model family: ``_models_lm`` (GPT-2) or ``_models_vision``."""
    return lm if base(op) in LM else vision


def shape_family(sh):
    """The family a shape (dict, "K=.." string or tuple) is written for: GPT-2's has T / four entries."""
    if isinstance(sh, str):
        sh = dict(p.split("=") for p in sh.split(","))
    return lm if ("T" in sh if isinstance(sh, dict) else len(sh) == len(lm.KEYS)) else vision


def default_shapes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda":
        layouts = (1,) if quick else (1, 0)
        return {op: [LM_GPU_TARGET] if family(op) is lm else [vision.shape(64, 224, cl) for cl in layouts]
                for op in OPS}
    out = {}
    for op in OPS:
        if family(op) is lm:
            out[op] = [lm.shape(1, 64)] + ([] if quick else [lm.shape(1, 128)])
        elif is_train(op):
            out[op] = []
        else:
            out[op] = [CPU_TARGET] + ([] if quick or base(op) not in PYDL_MODELS else [vision.shape(8, 224, 1)])
    return out


def smoke_shapes() -> dict:
    """Tiny shapes of every op (tests, --smoke): 32² images, a 2-layer 64-wide GPT-2 on 8 tokens."""
    return {op: [lm.shape(2, 8, 2, 64) if family(op) is lm else vision.shape(2, 32, 1)] for op in OPS}


def series(sh) -> str:
    """A shape's plot label: every key but B ("S=224,cl=1", "T=1024,L=12,D=768")."""
    fam = shape_family(sh)
    return ",".join(f"{k}={v}" for k, v in zip(fam.KEYS[1:], fam.dims(sh)[1:]))


def modes(op: str) -> tuple:
    return ("fwd+bwd",) if is_train(op) else ("fwd",)


def make_inputs(op: str, sh, dtype: torch.dtype, device: torch.device, seed: int):
    """The family's inputs (``_models_vision`` / ``_models_lm``: data, then float32 parameters) and,
    for train ops, upstream gradients of the outputs."""
    return family(op).make_inputs(base(op), sh, dtype, device, seed, is_train(op))


# ------------------------------------------------------------------------------- models

def _materialise(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Storage on ``device``; tied parameters (GPT-2's lm_head = wte) tied again, which ``to_empty``
    undoes; BN running stats reset (the parameters are bound per call)."""
    tied: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(n)
    model = model.to_empty(device=device)
    for first, *others in tied.values():
        for n in others:
            owner, _, attr = n.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    for m in model.modules():
        if hasattr(m, "reset_running_stats"):
            m.reset_running_stats()
    return model


def model_fn(op: str, which: str, compiled: bool = False, patched: bool = False) -> Callable:
    """fn(*inputs) -> outputs: the ``which`` model ("pydl": pydl.models; "ref": timm / transformers),
    after ``pydl.patch`` when ``patched``, under torch.compile when ``compiled``, with the input
    parameters bound by name (``torch.func.functional_call``); train mode when an input requires
    grad (the fwd+bwd rows), else eval under no_grad; autocast in the inputs' low-precision dtype.
    The model is built (once per device and family config, e.g. ViT's image size) on first call and
    kept in ``fn.built`` {(device, config): (module, its call)}; ValueError at once for a model
    pydl.models does not have."""
    name, fam = base(op), family(op)
    if which == "pydl" and name not in PYDL_MODELS:
        raise ValueError(f"{name}: no pydl.models model (the {PATCHED} provider runs pydl's ops in timm's)")
    built: dict = {}

    def build(device: torch.device, cfg):
        mod = _materialise(fam.meta_model(which, name, cfg), device)
        if patched:
            import pydl

            pydl.patch(mod)
        binding = fam.binding(which, fam.param_names(name, cfg))
        own = {n for n, _ in mod.named_parameters()}
        if own != {n for n, _ in binding}:
            odd = sorted(own.symmetric_difference(n for n, _ in binding))
            raise ValueError(f"models: {which} {name}'s parameters are not the inputs' ({odd[:4]} ...)")

        def forward(data, params):
            bound = {n: p.t() if transposed else p for (n, transposed), p in zip(binding, params)}
            return fam.forward(which, mod, data, bound)
        return mod, (compile_fn(forward) if compiled else forward)

    def fn(*inputs):
        data, params = inputs[: fam.N_DATA], inputs[fam.N_DATA:]
        key = (data[0].device, fam.model_config(name, data, params))
        if key not in built:
            built[key] = build(*key)
        mod, run = built[key]
        training = any(t.requires_grad for t in inputs)
        if mod.training != training:
            mod.train(training)
        dt = fam.amp_dtype(data)
        amp = torch.autocast(data[0].device.type, dtype=dt) if dt in LOW else contextlib.nullcontext()
        with amp, (contextlib.nullcontext() if training else torch.no_grad()):
            return run(data, params)
    fn.built = built
    return fn


def work(op: str, mode: str, sh, dtype) -> int:
    """FLOPs of one call: the forward's (``flops`` of the family); a training step counts 3× (the
    backward's data and weight gradients are one forward each). Not counted by FlopCounterMode through
    the backward: torch 2.13 counts a grouped (depthwise) convolution's backward as a dense one (96× too
    many for ConvNeXt's 7×7 layers)."""
    return family(op).flops(base(op), sh) * (3 if is_train(op) else 1)


def grad_names(op: str) -> tuple:
    return family(op).grad_names(base(op)) if is_train(op) else ()


def parameter_grads(op: str) -> tuple:
    """The parameters' gradient names: each a sum over every token / pixel of the batch, so the gate
    scales their elementwise atol by max|ref| (a near-zero entry of a large gradient differs by the
    rounding of the whole sum; fp32 GPT-2 wpe at T=128 showed 2e-3 on entries of a ~1e2 gradient)."""
    return tuple(n for n in grad_names(op) if n not in ("dx", "damp"))


def tolerances(dtype: torch.dtype) -> tuple:
    """(relative-norm floor, atol, rtol): whole networks, 12 to 50+ layers deep; train-mode BN over a
    small batch is badly conditioned (fp32 runs differ by ~1e-3 in the gradients)."""
    if dtype in (torch.float32, torch.float64):
        return 2e-3, 1e-3, 1e-2
    return 5e-2, 1 / 8, 1 / 8


# --------------------------------------------------------------------------------- report

# The cells the targets read: (device, op, shape, dtype, how the table names it).
_CPU_CELL = ("cpu", "convnext_tiny", CPU_TARGET, "float32", "B=8 224² NCHW float32")
_GPU_CELL = ("cuda", "convnext_tiny.train", GPU_TARGET, "bfloat16", "B=64 224² channels_last bf16")
_LM_CELL = ("cuda", "gpt2.train", LM_GPU_TARGET, "bfloat16", "B=8 T=1024 bf16")
# (target, cell, provider, baseline, minimum speed-up)
TARGETS = (
    ("CPU ConvNeXt-T inference: pydl ≥ 1.0× timm eager", _CPU_CELL, "pydl", EAGER, 1.0),
    ("CPU ConvNeXt-T inference: patched timm ≥ 1.0× unpatched", _CPU_CELL, PATCHED, EAGER, 1.0),
    ("GPU ConvNeXt-T training step: pydl ≥ 1.3× timm eager", _GPU_CELL, "pydl", EAGER, 1.3),
    ("GPU ConvNeXt-T training step: pydl ≥ 1.0× timm compile", _GPU_CELL, "pydl", "torch-compile", 1.0),
    ("GPU ConvNeXt-T training step: patched timm ≥ 1.2× unpatched", _GPU_CELL, PATCHED, EAGER, 1.2),
    ("GPU GPT-2-small training step: pydl ≥ 1.1× HF SDPA eager", _LM_CELL, "pydl", EAGER, 1.1),
    ("GPU GPT-2-small training step: patched HF ≥ 1.1× HF SDPA eager", _LM_CELL, PATCHED, EAGER, 1.1),
)
COLUMNS = ("pydl", EAGER, "torch-compile", "pydl-compile", PATCHED)


def items(op: str, sh) -> int:
    """What one call processes: images (vision) or tokens (GPT-2: B·T)."""
    d = family(op).dims(sh)
    return d[0] * d[1] if family(op) is lm else d[0]


def _rate(r, n: int) -> str:
    return f"{n / (float(r['p50_ms']) * 1e-3):.1f}" if measured(r) else "—"


def _ratio(r, base) -> str:
    sp = speedup(r, base)
    return f"{sp:.2f}×{flag_note([x for x in (r, base) if x])}" if sp else "—"


def report(rows: list) -> list:
    """Markdown: every cell's images/s or tokens/s per provider, pydl and patched over eager, then the
    targets."""
    by = cells_by(rows, NAME, ("device", "op", "mode", "shape", "dtype"))
    lines = ["## Models (images/s; gpt2: tokens/s)", "",
             "| device | model | mode | cell | dtype | pydl | eager (timm / HF) | compile | pydl compile | patched | "
             "pydl / eager | patched / unpatched |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (dev, op, mode, shp, dtype), per in sorted(by.items()):
        n, e = items(op, shp), per.get(EAGER)
        rates = " | ".join(_rate(per.get(p), n) for p in COLUMNS)
        lines.append(f"| {dev} | {op} | {mode} | {shp} | {dtype} | {rates} | {_ratio(per.get('pydl'), e)} | "
                     f"{_ratio(per.get(PATCHED), e)} |")
    lines += ["", "## Models targets", "",
              "| target | cell | measured | baseline | speed-up | % of ceiling | verdict |",
              "|---|---|---|---|---|---|---|"]
    for label, (dev, op, sh, dtype, cell), prov, base_name, need in TARGETS:
        per = by.get((dev, op, modes(op)[0], shape_str(sh), dtype), {})
        missing = " (no such cell in this run)" if dev == "cpu" else " (no CUDA cell in this run)"
        lines.append(target_row([label, cell], per.get(prov), per.get(base_name),
                                lambda sp, _, need=need: sp >= need, note="" if per else missing))
    return lines + [""]


SUITE = Suite(
    name=NAME,
    ops=OPS,
    providers=(
        Provider("pydl", lambda op: model_fn(op, "pydl"), PYDL),
        Provider(EAGER, lambda op: model_fn(op, "ref"), REFERENCE),
        Provider(PATCHED, lambda op: model_fn(op, "ref", patched=True), PYDL),
        Provider("torch-compile", lambda op: model_fn(op, "ref", compiled=True), COMPILED, devices=("cuda",)),
        Provider("pydl-compile", lambda op: model_fn(op, "pydl", compiled=True), COMPILED, devices=("cuda",)),
    ),
    make_inputs=lambda *a: make_inputs(*a),
    shapes=lambda device, quick: default_shapes(device, quick),
    smoke_shapes=smoke_shapes(),
    probe_shape=PROBE,
    work=lambda *a: work(*a),
    metric=THROUGHPUT,
    modes=lambda op: modes(op),
    out_names=lambda op: family(op).OUT_NAMES,
    grad_names=lambda op: grad_names(op),
    reduction_grads=lambda op: parameter_grads(op),
    diff_inputs=None,
    tolerances=lambda dtype: tolerances(dtype),
    dtypes=lambda device: [torch.bfloat16 if device.type == "cuda" else torch.float32],
    timing=dict(budget_s=3.0, min_reps=7, max_reps=200, warmup_s=0.0, min_warmup=2, rounds=7),
    plot_x=lambda s: shape_family(s).dims(s)[0],
    x_label="B (images or sequences per call)",
    plot_series=lambda s: series(s),
    report=lambda rows: report(rows),
)
