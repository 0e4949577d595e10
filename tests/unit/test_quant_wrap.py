"""Wrapping, calibration and SmoothQuant on small hand-built models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.quant import QuantLinear, calibrate, head_names, quant_linears, scheme, wrap
from outlierlab.quant.evaluate import logits_of


class Tiny(nn.Module):
    """embedding → fc → relu → proj → head tied to the embedding (named ``out``)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.proj = nn.Linear(16, 8)
        self.out = nn.Linear(8, 20, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.out(self.proj(torch.relu(self.fc(self.emb(idx)))))


def _model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def test_wrap_copies_and_leaves_the_original_alone():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert head_names(model) == {"out"}  # tied to the embedding, whatever its name
    q = wrap(model, scheme("w8a8-tensor"))
    assert list(quant_linears(q)) == ["fc", "proj"]
    assert isinstance(model.fc, nn.Linear) and not isinstance(model.fc, QuantLinear)
    assert type(q.out) is nn.Linear
    calibrate(q, scheme("w8a8-tensor"), [torch.randint(0, 20, (4, 6))], logits_of)
    q(torch.randint(0, 20, (2, 6)))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    with_head = wrap(model, scheme("w8a8-tensor", quantize_head=True))
    assert list(quant_linears(with_head)) == ["fc", "proj", "out"]


def test_static_range_is_the_calibration_min_max_and_off_is_exact():
    model = _model()
    cfg = scheme("w8a8-tensor", w_bits=16)  # ranges are observed with weights quantised
    q = wrap(model, cfg)
    idx = torch.randint(0, 20, (3, 5))
    torch.testing.assert_close(q(idx), model(idx), rtol=0, atol=0)  # quantisers off
    seen = []
    hook = model.proj.register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    batches = [torch.randint(0, 20, (4, 6)) for _ in range(3)]
    for b in batches:
        model(b)
    hook.remove()
    calibrate(q, cfg, batches, logits_of)
    allx = torch.cat([s.reshape(-1) for s in seen])
    assert q.proj.act.calib_lo == pytest.approx(float(allx.min()), rel=1e-3)
    assert q.proj.act.calib_hi == pytest.approx(float(allx.max()), rel=1e-3)
    # evaluating afterwards does not move the static range
    q(torch.randint(0, 20, (8, 6)) * 0 + 3)
    assert q.proj.act.calib_hi == pytest.approx(float(allx.max()), rel=1e-3)


def test_calibration_needs_a_batch_for_static_ranges():
    q = wrap(_model(), scheme("w8a8-tensor"))
    with pytest.raises(ConfigError, match="at least one"):
        calibrate(q, scheme("w8a8-tensor"), [], logits_of)
    dyn = wrap(_model(), scheme("w8a8-dynamic"))
    calibrate(dyn, scheme("w8a8-dynamic"), [], logits_of)  # dynamic: nothing to calibrate


def test_smoothing_preserves_the_function_and_moves_the_outlier_into_weights():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    cfg = scheme("w8a8-tensor", smooth_alpha=0.5)
    ql = QuantLinear.from_module(lin, cfg)
    x = torch.randn(64, 8)
    x[:, 2] *= 100.0  # an outlier input channel
    ql.smooth_observe = True
    ql(x)
    ql.smooth_observe = False
    ql.set_smoothing(0.5)
    with torch.no_grad():
        torch.testing.assert_close(ql(x), lin(x), rtol=1e-5, atol=1e-4)
    smoothed = x * ql.inv_smooth
    ratio = x.abs().amax(0).max() / x.abs().amax(0).median()
    ratio_s = smoothed.abs().amax(0).max() / smoothed.abs().amax(0).median()
    assert ratio_s < ratio / 5  # channel ranges are far more even after migration


def test_quantised_linear_error_per_tensor_vs_per_token_on_token_outlier():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    x = torch.randn(256, 32)
    x[:4, 3] = 200.0  # a few tokens with a huge value
    ref = lin(x).detach()
    errs = {}
    for name in ("w8a8-tensor", "w8a8-dynamic"):
        cfg = scheme(name, w_bits=16)
        ql = QuantLinear.from_module(lin, cfg)
        ql.quantize_weight()
        if cfg.a_granularity == "tensor":
            ql.act.mode = "observe"
            ql(x)
            ql.act.finalize()
        ql.act.mode = "quant"
        with torch.no_grad():
            errs[name] = (ql(x) - ref)[4:].pow(2).mean()
    assert errs["w8a8-tensor"] > 10 * errs["w8a8-dynamic"]
