"""One beam-search step: the best continuations of every beam over the vocabulary.

    scores, tokens, beams = beam_search_step(logits, beam_scores, num_candidates)

    s = log_softmax(logits.float(), -1).view(B, K, V) + beam_scores[..., None]   # (B, K, V)
    s[..., banned_tokens] = -inf                      # after the normalization, as Hugging Face masks
    scores, flat = topk(s.view(B, K * V), num_candidates)                        # sorted descending
    tokens, beams = flat % V, flat // V

logits (B*K, V) float32 / float16 / bfloat16 (float64 too on CPU), rows beam-major (row b*K + k is
beam k of batch item b), any row stride with a unit last stride; beam_scores (B, K) float32
(float64 with float64 logits); -> scores (B, n) in beam_scores' dtype, tokens and beams (B, n) int64.
``banned_tokens`` (an int64 tensor of ids in [0, V), or None) are never chosen: Hugging Face's
``min_new_tokens`` masks EOS that way.

Ties (equal scores) are ordered by the lower flat index k*V + v first on every backend, so results
are deterministic and equal across backends (``torch.topk`` promises no order for ties; the torch
backend here sorts them). Limits of the native kernels: K <= 64, n <= 256 (beyond: the torch backend).

Backends: ``native`` (csrc/cpu/beam_search_step.cpp, csrc/cuda/beam_search_step.cu: one read of the
logits, online max / sum and partial top-n per vocabulary block, then a merge) and ``torch`` (the
composition above; traceable). The op has no gradient (inference only): every output is integer or a
selection of scores no one differentiates through. Eager calls reach the kernel directly; traced ones
go through the custom op ``pydl::beam_search_step``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _native, backends
from ._common import TRACED, device_type, eager_mode, same_device, vmap_by_loop

MAX_BEAMS = 64  # csrc/include/pydl/beam_search_step.h: kBeamSearchMaxBeams
MAX_CANDIDATES = 256  # kBeamSearchMaxCandidates
_NATIVE_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float64)
_NATIVE_CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def beam_search_step(logits: Tensor, beam_scores: Tensor, num_candidates: int, *,
                     banned_tokens: Optional[Tensor] = None, backend: Optional[str] = None) -> tuple:
    """The top ``num_candidates`` continuations of each batch item's beams.

    logits (B*K, V); beam_scores (B, K); banned_tokens (nb,) int64 or None. Returns
    (scores (B, n), tokens (B, n) int64, beams (B, n) int64), sorted by score descending, ties by
    the lower flat index k*V + v. ``backend`` forces "native" or "torch".
    """
    _check_args(logits, beam_scores, num_candidates, banned_tokens)
    K = beam_scores.shape[1]
    name = DISPATCH.choose((device_type(logits), logits.dtype, K <= MAX_BEAMS and num_candidates <= MAX_CANDIDATES),
                           backend)
    if name == "torch":
        return _torch_step(logits, beam_scores, num_candidates, banned_tokens)
    if eager_mode((logits, beam_scores, banned_tokens)) != TRACED:
        return _native_step(logits, beam_scores, num_candidates, banned_tokens)
    return tuple(torch.ops.pydl.beam_search_step(logits, beam_scores, num_candidates, banned_tokens))


def beam_search_step_ref(logits: Tensor, beam_scores: Tensor, num_candidates: int,
                         banned_tokens: Optional[Tensor] = None) -> tuple:
    """The float64 reference: scores (B, n) float64, tokens, beams (B, n) int64, ties by flat index."""
    return _torch_step(logits.double(), beam_scores.double(), num_candidates, banned_tokens)


# ---- argument checks and backend choice -------------------------------------------------------------

def _check_args(logits, beam_scores, num_candidates, banned_tokens) -> None:
    """ValueError / TypeError naming the argument."""
    for name, t in (("logits", logits), ("beam_scores", beam_scores)):
        if not isinstance(t, Tensor):
            raise TypeError(f"beam_search_step: {name} must be a Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"beam_search_step: {name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"beam_search_step: {name} must have 2 dims, got shape {tuple(t.shape)}")
    B, K = beam_scores.shape
    V = logits.shape[1]
    if K < 1:
        raise ValueError(f"beam_search_step: beam_scores must have at least one beam, got shape {tuple(beam_scores.shape)}")
    if logits.shape[0] != B * K:
        raise ValueError(f"beam_search_step: logits must have B*K = {B * K} rows for beam_scores of shape "
                         f"{tuple(beam_scores.shape)}, got {tuple(logits.shape)}")
    if V < 1:
        raise ValueError(f"beam_search_step: logits must have a vocabulary of at least 1, got {tuple(logits.shape)}")
    want = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if beam_scores.dtype != want:
        raise TypeError(f"beam_search_step: beam_scores must have dtype {want} for {logits.dtype} logits, got "
                        f"{beam_scores.dtype}")
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int):
        raise TypeError(f"beam_search_step: num_candidates must be an int, got {num_candidates!r}")
    if not 1 <= num_candidates <= K * V:
        raise ValueError(f"beam_search_step: num_candidates must be in [1, K*V = {K * V}], got {num_candidates}")
    if not same_device(beam_scores, logits):
        raise ValueError(f"beam_search_step: logits is on {logits.device} but beam_scores is on {beam_scores.device}")
    if banned_tokens is not None:
        if not isinstance(banned_tokens, Tensor) or banned_tokens.dtype != torch.int64 or banned_tokens.dim() != 1:
            raise TypeError("beam_search_step: banned_tokens must be None or a 1-D int64 tensor of token ids")
        if not same_device(banned_tokens, logits):
            raise ValueError(f"beam_search_step: banned_tokens is on {banned_tokens.device} but logits is on "
                             f"{logits.device}")


def _native_reasons(key: tuple) -> list:
    reasons = backends.native_reasons(key[0], key[1], _NATIVE_CPU_DTYPES, _NATIVE_CUDA_DTYPES)
    if not key[2]:
        reasons.append(f"the native kernels take at most {MAX_BEAMS} beams and {MAX_CANDIDATES} candidates")
    return reasons


# key: (device type, dtype, within the native limits). Native first (measured on CPU: pydl.bench
# beam_search; unmeasured on a GPU so far).
DISPATCH = backends.Dispatcher("beam_search_step", {"native": _native_reasons, "torch": lambda key: []},
                               {"cpu": ("native", "torch"), "cuda": ("native", "torch")})


# ---- the torch backend -----------------------------------------------------------------------------

def _torch_step(logits, beam_scores, n, banned_tokens):
    """The composition: log_softmax in float32 (float64), beam scores added, banned ids -inf, top-n over
    K*V, ties ordered by flat index. torch.topk orders ties arbitrarily and, with several candidates
    tied at the n-th place, keeps an arbitrary subset: the kept n are re-sorted by (score desc, index
    asc), and in eager mode a tie at the boundary (one host read) falls back to a full stable sort.
    Under tracing that check is skipped (no sync): boundary ties then follow torch.topk."""
    B, K = beam_scores.shape
    V = logits.shape[1]
    s = torch.log_softmax(logits.to(beam_scores.dtype), dim=-1).view(B, K, V) + beam_scores[..., None]
    if banned_tokens is not None and banned_tokens.numel():
        s = s.index_fill(2, banned_tokens, float("-inf"))
    s = s.view(B, K * V)  # (B, K*V)
    flat = torch.topk(s, n, dim=1).indices  # (B, n)
    if eager_mode((s,)) != TRACED and _tie_at_boundary(s, flat):
        flat = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :n]
    else:
        flat = flat.sort(dim=1).values  # ascending index: the stable sort below keeps ties in that order
        flat = flat.gather(1, torch.sort(s.gather(1, flat), dim=1, descending=True, stable=True).indices)
    return s.gather(1, flat), flat % V, flat // V


def _tie_at_boundary(s: Tensor, flat: Tensor) -> bool:
    """Whether some row has more entries equal to its n-th score than the top-n kept (one host read)."""
    kept = s.gather(1, flat)  # (B, n)
    kth = kept.min(dim=1, keepdim=True).values
    return bool(((s == kth).sum(dim=1) > (kept == kth).sum(dim=1)).any())


# ---- the native kernels ----------------------------------------------------------------------------

def _native_step(logits, beam_scores, n, banned_tokens):
    """The native kernel on checked arguments."""
    B, K = beam_scores.shape
    V = logits.shape[1]
    out_scores = beam_scores.new_empty((B, n))
    out_tokens = logits.new_empty((B, n), dtype=torch.int64)
    out_beams = logits.new_empty((B, n), dtype=torch.int64)
    if B == 0:
        return out_scores, out_tokens, out_beams
    if logits.stride(1) != 1 and V > 1:
        logits = logits.contiguous()
    scores = beam_scores if beam_scores.is_contiguous() else beam_scores.contiguous()
    banned = None
    if banned_tokens is not None and banned_tokens.numel():
        banned = banned_tokens if banned_tokens.is_contiguous() else banned_tokens.contiguous()
    args = (B, K, V, n, _native.DTYPE_CODES[logits.dtype], logits.data_ptr(), logits.stride(0) if B * K > 1 else V,
            _native.DTYPE_CODES[scores.dtype], scores.data_ptr(), 0 if banned is None else banned.data_ptr(),
            0 if banned is None else banned.numel(), out_scores.data_ptr(), out_tokens.data_ptr(),
            out_beams.data_ptr())
    c = _native.module()
    if logits.is_cuda:
        with _native.cuda_device(logits):
            nbytes = c.beam_search_step_cuda_workspace_bytes(*args)
            workspace = logits.new_empty(nbytes, dtype=torch.uint8) if nbytes else None
            c.beam_search_step_cuda(*args, 0 if workspace is None else workspace.data_ptr(),
                                    _native.cuda_stream(logits))
    else:
        c.beam_search_step_cpu(*args, _native.num_threads())
    return out_scores, out_tokens, out_beams


@torch.library.custom_op("pydl::beam_search_step", mutates_args=())
def beam_search_step_op(logits: Tensor, beam_scores: Tensor, num_candidates: int,
                        banned_tokens: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """The native kernel (traced path); see :func:`beam_search_step`."""
    return _native_step(logits, beam_scores, num_candidates, banned_tokens)


@beam_search_step_op.register_fake
def _(logits, beam_scores, num_candidates, banned_tokens):
    B = beam_scores.shape[0]
    return (beam_scores.new_empty((B, num_candidates)), logits.new_empty((B, num_candidates), dtype=torch.int64),
            logits.new_empty((B, num_candidates), dtype=torch.int64))


@torch.library.register_vmap("pydl::beam_search_step")
def _(info, in_dims, *args):
    return vmap_by_loop(beam_search_step_op, info, in_dims, *args)
