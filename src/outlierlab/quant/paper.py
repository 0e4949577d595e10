"""Bondarenko et al. (2023)'s W8A8 sites in outlierlab's GPT (scheme ``w8a8-paper``, science §4,
docs/quant.md "w8a8-paper").

Their code (Qualcomm-AI-research/outlier-free-transformers, ``quantized_opt.py``,
``autoquant_utils.py``) fake-quantises, with the head left in full precision (``fp32_head``):

- weights (symmetric per tensor, their MSE grid): every linear but the head and the attention
  gate, the token and position embedding tables, every norm's gain (not its bias);
- activations (asymmetric per tensor, static running range): the embedding sum, every norm
  output, q, k, v (each projection's output), QKᵀ (before the mask), the softmax output, P·V,
  the MLP activation output (fc1 and its ReLU fused: one site), the attention and MLP output
  projections' outputs, and both residual sums of every block.

A linear's input is never quantised again: it arrives from one of those sites. :func:`attach`
puts the sites on a wrapped copy (:func:`outlierlab.quant.wrap.wrap` calls it); the model reads
them through ``CausalSelfAttention.sites`` and ``Block.sites``.
"""

from __future__ import annotations

from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.quantizers import grid_quantize_weight
from outlierlab.quant.wrap import ActQuant, PaperSites, QuantLinear, norm_modules

ATTENTION_SITES = ("q", "k", "v", "scores", "probs", "context")
OUTPUT_LINEARS = ("attn.proj", "mlp.proj", "embed_proj", "unembed_proj")
"""Linears whose output is a site of its own (qkv is split into q, k, v; mlp.fc is fused with
its activation, whose output is the site)."""


def check_model(model: nn.Module) -> None:
    """ConfigError unless ``model`` is an outlierlab GPT (the sites are inside its attention)."""
    from outlierlab.model.gpt import GPT

    if not isinstance(model, GPT):
        raise ConfigError(f"w8a8-paper quantises attention internals and needs an outlierlab GPT, "
                          f"not {type(model).__name__}; allowed for other models: w8a8-outputs")


def paper_linears(model: nn.Module, names: list[str]) -> list[str]:
    """The linears whose weights are quantised: all of ``names`` but the attention gates (their
    code leaves the gate in full precision: "do not quantize for now")."""
    return [n for n in names if not n.endswith(".attn.gate")]


def _site(cfg: QuantConfig, name: str, kind: str, features: bool = True) -> ActQuant:
    aq = ActQuant(cfg)
    aq.point_name, aq.kind, aq.features = name, kind, features
    return aq


class AttentionSites(nn.Module):
    """The six activation sites inside one attention layer (``CausalSelfAttention.sites``)."""

    def __init__(self, cfg: QuantConfig, prefix: str) -> None:
        super().__init__()
        for s in ATTENTION_SITES:
            self.add_module(s, _site(cfg, f"{prefix}.{s}", "attention",
                                     features=s not in ("scores", "probs")))


class BlockSites(nn.Module):
    """The two residual sums of one block (``Block.sites``): after attention (``attn_sum``) and
    after the MLP (``mlp_sum``; the block output except in post-norm blocks, where it is the
    input of the second norm)."""

    def __init__(self, cfg: QuantConfig, prefix: str, post: bool) -> None:
        super().__init__()
        self.attn_sum = _site(cfg, f"{prefix}.attn_sum", "residual")
        self.mlp_sum = _site(cfg, f"{prefix}.{'mlp_sum' if post else 'resid_post'}", "residual")


def _output_hook(module: nn.Module, args: object, out: object) -> object:
    return module.outlierlab_output_quant(out)


def _hook_output(module: nn.Module, aq: ActQuant) -> None:
    module.outlierlab_output_quant = aq
    module.register_forward_hook(_output_hook)


def _quantize_weight_(param: nn.Parameter, aq: ActQuant, bits: int) -> None:
    """Q(w) in place (the wrapped copy's own tensor); its signal and noise added to ``aq``."""
    w = param.detach().float()
    wq = grid_quantize_weight(w, bits)
    aq.weight_signal += float(w.square().sum())
    aq.weight_noise += float((w - wq).square().sum())
    aq.has_weight = True
    param.data.copy_(wq.to(param.dtype))


def attach(qmodel: nn.Module, cfg: QuantConfig) -> None:
    """Put every site of the module docstring on ``qmodel`` (a wrapped GPT copy; norm outputs
    already carry their quantiser when ``cfg.quantize_norms``)."""
    if qmodel.lm_head.weight is qmodel.tok_emb.weight:  # the FP head keeps the FP table
        qmodel.lm_head.weight = nn.Parameter(qmodel.tok_emb.weight.detach().clone(),
                                             requires_grad=False)
    embed = _site(cfg, "embed.resid_post", "residual")
    _hook_output(qmodel.embed_out, embed)
    for table in (qmodel.tok_emb, qmodel.pos_emb):
        if table is not None:
            _quantize_weight_(table.weight, embed, cfg.w_bits)
    for norm in norm_modules(qmodel).values():
        weight = getattr(norm, "weight", None)
        weight = getattr(norm, "gain", None) if weight is None else weight
        if weight is None:
            continue
        aq = getattr(norm, "outlierlab_output_quant", None)
        if aq is None:  # norm outputs not quantised: the weight's numbers go on a silent site
            aq = ActQuant(cfg)
        _quantize_weight_(weight, aq, cfg.w_bits)
    for name, m in qmodel.named_modules():
        if isinstance(m, QuantLinear) and name.endswith(OUTPUT_LINEARS):
            m.out_act = ActQuant(cfg)
    post = qmodel.config.block == "post"
    for i, block in enumerate(qmodel.blocks):
        block.attn.sites = AttentionSites(cfg, f"blocks.{i}.attn")
        block.sites = BlockSites(cfg, f"blocks.{i}", post)
        _hook_output(block.mlp.act, _site(cfg, f"blocks.{i}.mlp.act", "mlp-act"))


PaperSites.check_model, PaperSites.linears, PaperSites.attach = check_model, paper_linears, attach
