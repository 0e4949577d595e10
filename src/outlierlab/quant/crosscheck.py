"""Our fake-quantised ``w8a8-dynamic`` against a real int8 implementation (science §4.1):
torchao's ``Int8DynamicActivationInt8WeightConfig`` (symmetric per-token int8 activations,
symmetric per-channel int8 weights, int8 × int8 → int32 matmuls on the CPU), applied with
``torchao.quantization.quantize_`` to a copy of the model's linears (the output head excluded,
as our schemes leave it), evaluated on the same windows.

The two differ by design in small ways, so they agree closely but not bit for bit: torchao's
symmetric grid (activations and weights) is [−128, 127] with scale max|x| / 127.5 where ours is
the restricted [−127, 127] with max|x| / 127 (:mod:`outlierlab.quant.quantizers`), and torchao
multiplies int8 values with int32 accumulation then rescales, where fake quantisation multiplies
dequantised float32 values. torchao is an optional extra
(``pip install 'outlierlab[crosscheck]'``); without it :func:`torchao_int8_perplexity` raises
:class:`~outlierlab.errors.ConfigError` naming the extra.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ConfigError


def torchao_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def _import_torchao() -> Any:
    """torchao.quantization, its import-time noise (missing GPU kernels, warnings) silenced."""
    if not torchao_available():
        raise ConfigError("--crosscheck needs torchao; install it with "
                          "pip install 'outlierlab[crosscheck]' (torchao>=0.18)")  # fmt: skip
    quiet = io.StringIO()
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(quiet), \
                contextlib.redirect_stdout(quiet):  # fmt: skip
            warnings.simplefilter("ignore")
            import torchao
            import torchao.quantization as q
    finally:
        logging.disable(level)
    q.__outlierlab_version__ = torchao.__version__
    return q


@torch.no_grad()
def torchao_int8_perplexity(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                            batch_size: int = 8) -> dict[str, Any]:  # fmt: skip
    """Perplexity of ``model`` (never modified) with every linear but the output head through
    torchao's real int8 dynamic-activation / int8-weight path, on windows x, targets y."""
    from outlierlab.quant.evaluate import perplexity
    from outlierlab.quant.wrap import head_names

    q = _import_torchao()
    heads = set(head_names(model))
    real = copy.deepcopy(model).eval()

    def linear_not_head(m: nn.Module, name: str) -> bool:
        return isinstance(m, nn.Linear) and name not in heads

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q.quantize_(real, q.Int8DynamicActivationInt8WeightConfig(), filter_fn=linear_not_head)
        ppl, loss = perplexity(real, x, y, batch_size)
    return {"library": "torchao", "version": q.__outlierlab_version__,
            "config": "Int8DynamicActivationInt8WeightConfig", "ppl": ppl, "loss": loss}


def crosscheck(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8,
               ours_ppl: float | None = None, cache: Any = None,
               calib: Any = None) -> dict[str, Any]:  # fmt: skip
    """Our ``w8a8-dynamic`` perplexity (``ours_ppl`` if already evaluated on these windows)
    beside torchao's real int8 path: ``{"ours_ppl", "torchao_ppl", "relative_difference",
    "version", ...}``; relative difference = torchao / ours − 1."""
    from outlierlab.quant import calibrate, logits_of, perplexity, scheme, wrap

    if ours_ppl is None:
        cfg = scheme("w8a8-dynamic")
        qm = wrap(model, cfg)
        calibrate(qm, cfg, calib or [], logits_of, cache)
        ours_ppl = perplexity(qm, x, y, batch_size)[0]
    real = torchao_int8_perplexity(model, x, y, batch_size)
    return {"scheme": "w8a8-dynamic", "library": real["library"], "ours_ppl": ours_ppl,
            "torchao_ppl": real["ppl"],
            "relative_difference": real["ppl"] / ours_ppl - 1, "version": real["version"],
            "config": real["config"], "windows": int(x.shape[0]), "seq_len": int(x.shape[1])}
