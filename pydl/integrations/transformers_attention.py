"""pydl inside Hugging Face transformers models: ``attn_implementation="pydl"`` and the LLaMA-family
RMSNorm forward.

    import pydl.integrations.transformers          # registers "pydl" (register_attention())
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="pydl")
    model.set_attn_implementation("pydl")          # or switch an existing model

``attention_forward`` is transformers' attention-interface function: the models call it with q, k,
v in (B, H, N, D) and the 4-D mask that the registered mask function built. It follows
``sdpa_attention_forward`` (transformers/integrations/sdpa_attention.py) step for step — the
``is_causal`` resolution, GQA, position bias, the output layout — and computes with
:func:`pydl.ops.attention` (≡ ``F.scaled_dot_product_attention``). The mask function registered with
it is transformers' ``sdpa_mask``, so the masks arrive exactly as sdpa gets them: None when there is
no padding (causal layers then get ``is_causal``, BERT full attention), else a bool (B, 1, Nq, Nk)
tensor, True = attend, broadcast over the heads (pydl reads it through its strides, no copy). Calls
pydl's op cannot take go to ``sdpa_attention_forward`` with the same arguments (see
:func:`attention_forward`).

``llama_rms_norm_forward`` is the forward of ``LlamaRMSNorm`` and of the classes in
:func:`rms_norm_classes` (same formula). :func:`patch_rules` are ``pydl.patch``'s rules for
transformers models: the outermost ``PreTrainedModel`` is switched to ``attn_implementation="pydl"``
(undone by ``pydl.unpatch`` with the implementation it had), and those RMSNorm modules get the pydl
forward; GPT-2's and BERT's ``nn.LayerNorm`` layers are taken by pydl.patch's generic rule.

Import-guarded: importing this module imports transformers (ImportError naming the package when it
is missing); pydl never imports it unless asked.
"""

from __future__ import annotations

import functools
import importlib
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..models._timm import import_transformers
from ..ops import attention, rms_norm
from ..patch import Rule, Swap, mixed_class

try:
    _transformers = import_transformers()
except ImportError as e:  # pragma: no cover - transformers is optional
    raise ImportError("pydl.integrations.transformers needs the transformers package "
                      "(pip install transformers)") from e

from transformers.integrations import sdpa_attention as _sdpa  # noqa: E402  (after the guard)
from transformers.masking_utils import sdpa_mask as _sdpa_mask  # noqa: E402

_logger = _transformers.utils.logging.get_logger(__name__)
# transformers versions whose sdpa forward does not combine ``position_bias`` into the mask lack it.
_position_bias_mask = getattr(_sdpa, "create_position_bias_mask", None)
_NAME = "pydl"
_MASK_DTYPES = (torch.bool, torch.float32)
_PYDL_DEVICES = ("cpu", "cuda")  # others (npu, xpu, mps) get sdpa's device-specific handling


# ---- attention -------------------------------------------------------------------------------------

def _needs_sdpa(query: Tensor, attention_mask: Optional[Tensor], position_bias: Optional[Tensor]) -> bool:
    """Whether this call must go to transformers' sdpa function: jit tracing, a device other than
    CPU/CUDA, a mask or position bias of a dtype pydl's op refuses (it takes bool, float32 or q's
    dtype), or a position bias this transformers version's sdpa path does not combine."""
    if torch.jit.is_tracing() or query.device.type not in _PYDL_DEVICES:
        return True
    if attention_mask is not None and attention_mask.dtype not in _MASK_DTYPES and attention_mask.dtype != query.dtype:
        return True
    if position_bias is not None:
        return _position_bias_mask is None or (position_bias.dtype != torch.float32
                                               and position_bias.dtype != query.dtype)
    return False


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """transformers' attention interface, computed with :func:`pydl.ops.attention`.

    module: the calling attention layer (read: ``num_key_value_groups``, ``is_causal``);
    query (B, H, Nq, D), key (B, Hkv, Nk, D), value (B, Hkv, Nk, Dv); attention_mask: None or a
    mask broadcastable to (B, H, Nq, Nk), bool (True = attend) or additive float; dropout: the
    attention-dropout probability (the models pass 0.0 in eval mode); scaling: the softmax scale
    (None: 1/sqrt(D)); is_causal: overrides ``module.is_causal`` (default True). Keyword
    ``position_bias`` (B or 1, H, Nq, Nk), as T5's layers pass it, is added to the scores.

    Returns (attn_output (B, Nq, H, Dv) contiguous, None) — no attention weights — as
    ``sdpa_attention_forward``, with its semantics: causal (top-left aligned) only when
    Nq > 1, no mask is given and the layer is causal; GQA when ``module.num_key_value_groups > 1``
    (pydl's ``enable_gqa``: k/v are never repeated). ``softcap`` is refused with a ValueError and
    ``output_attentions=True`` warns once (no weights are returned), as sdpa does. Calls under
    ``torch.jit.trace``, on devices other than CPU/CUDA, or with a mask or ``position_bias`` dtype
    the op does not take go to ``sdpa_attention_forward`` with the same arguments.
    """
    position_bias = kwargs.pop("position_bias", None)
    if _needs_sdpa(query, attention_mask, position_bias):
        return _sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                            scaling=scaling, is_causal=is_causal, position_bias=position_bias,
                                            **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("attention_forward: `pydl` attention does not support `softcap` (as `sdpa`); use "
                         "`eager`, `flex_attention`, or a flash-attention kernel supporting it")
    if kwargs.get("output_attentions", False):
        _logger.warning_once("`pydl` attention does not support `output_attentions=True` (as `sdpa`): no "
                             "attention weights are returned. Set the attention to `eager` to get them.")
    enable_gqa = getattr(module, "num_key_value_groups", 1) > 1
    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # The shape test first: under torch.compile with dynamic shapes `q_length > 1` guards to a bool.
    is_causal = q_length > 1 and attention_mask is None and is_causal
    if is_causal and key.shape[2] > q_length:
        # Prefill into an empty static cache: top-left causal never reaches keys past Nq.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        attention_mask = _position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, is_causal=bool(is_causal),
                    scale=scaling, enable_gqa=enable_gqa)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``"pydl"`` with transformers (idempotent; done when this module is imported).

    ``AttentionInterface`` gets :func:`attention_forward`, ``AttentionMaskInterface`` transformers'
    ``sdpa_mask`` (the masks sdpa gets). Both registries are global: every model, including those
    built later, accepts ``attn_implementation="pydl"`` (``from_config``, ``from_pretrained``,
    ``set_attn_implementation``). Without the mask entry transformers would build no mask at all.
    """
    _transformers.AttentionInterface.register(_NAME, attention_forward)
    _transformers.AttentionMaskInterface.register(_NAME, _sdpa_mask)


# ---- RMSNorm ---------------------------------------------------------------------------------------

# transformers classes whose forward is LlamaRMSNorm's, character for character (checked against the
# installed version by tests/integrations/test_transformers_attention.py). Not Gemma's (1 + weight),
# nor Olmo2's (weight applied before the cast back), nor Qwen3-Next/Qwen3.5's (Gemma-style).
_RMS_NORM_CLASSES = (
    ("llama", "LlamaRMSNorm"), ("mistral", "MistralRMSNorm"), ("mixtral", "MixtralRMSNorm"),
    ("qwen2", "Qwen2RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"), ("qwen3", "Qwen3RMSNorm"),
    ("qwen3_moe", "Qwen3MoeRMSNorm"), ("phi3", "Phi3RMSNorm"), ("granite", "GraniteRMSNorm"),
    ("deepseek_v3", "DeepseekV3RMSNorm"), ("smollm3", "SmolLM3RMSNorm"), ("glm4", "Glm4RMSNorm"),
)


def llama_rms_norm_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """``LlamaRMSNorm.forward`` computed with :func:`pydl.ops.rms_norm`.

    self: a module of a class in :func:`rms_norm_classes` (``weight`` (N,), ``variance_epsilon``);
    hidden_states: (..., N). Returns ``weight * (x * rsqrt(mean(x², -1) + eps)).to(x.dtype)`` of
    x's shape and of HF's dtype, ``promote(weight.dtype, x.dtype)``. Normalised in float32 as HF
    (float64 x in float64, where HF rounds through float32). A weight of x's dtype is fused into the
    kernel (one rounding instead of HF's two: within an ulp of HF's output in bfloat16/float16);
    otherwise x is normalised in x's dtype and multiplied by the weight with type promotion,
    which is HF's own computation.
    """
    weight = self.weight
    if isinstance(hidden_states, Tensor) and weight.dtype == hidden_states.dtype:
        return rms_norm(hidden_states, weight, self.variance_epsilon)
    return weight * rms_norm(hidden_states, None, self.variance_epsilon)  # (rms_norm refuses a non-Tensor x)


@functools.cache
def rms_norm_classes() -> Tuple[type, ...]:
    """The RMSNorm classes of the installed transformers that :func:`llama_rms_norm_forward` is
    the forward of (LLaMA, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Phi-3, Granite,
    DeepSeek-V3, SmolLM3, GLM-4; those this version does not have are left out)."""
    found = []
    for module, name in _RMS_NORM_CLASSES:
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        except (ImportError, AttributeError):
            continue
        found.append(cls)
    return tuple(found)


# ---- pydl.patch rules ------------------------------------------------------------------------------

class HFRMSNorm(nn.Module):
    """The class mixed into a patched LLaMA-family RMSNorm: its forward is :func:`llama_rms_norm_forward`."""

    forward = llama_rms_norm_forward


def _rms_norm_rule(module: nn.Module):
    if type(module) not in rms_norm_classes():
        return None
    return Swap(mixed_class(HFRMSNorm, type(module)))


def _attention_rule(module: nn.Module):
    """A PreTrainedModel whose config is not on "pydl" yet: switch it (its sub-models share the config,
    so only the outermost one is switched; an inner one then finds "pydl" and is left alone)."""
    if not isinstance(module, _transformers.PreTrainedModel):
        return None
    current = getattr(module.config, "_attn_implementation", None)
    if current == _NAME:
        return None
    if not type(module)._can_set_attn_implementation():
        return f"{type(module).__name__} does not use transformers' attention interface"
    return Swap(call=("set_attn_implementation", _NAME), undo=("set_attn_implementation", current),
                new=f'attn_implementation="{_NAME}" (was "{current}")')


def patch_rules() -> list:
    """The ``pydl.patch`` rules for transformers models (registers "pydl" first: it is, at import)."""
    return [Rule("attention", _attention_rule), Rule("rms_norm", _rms_norm_rule)]


register_attention()

__all__ = ["HFRMSNorm", "attention_forward", "llama_rms_norm_forward", "patch_rules", "register_attention",
           "rms_norm_classes"]
