"""The report: HTML parses, is self-contained, names every run; Markdown has the same claims
and table; figures are real PNGs."""

import base64
import json
from html.parser import HTMLParser

import pytest

from outlierlab.cli import main
from outlierlab.jsonable import write_json
from outlierlab.run_folder import RunFolder
from run_fixtures import write_run

PNG = b"\x89PNG\r\n\x1a\n"


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.text, self.imgs, self.tags, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (self.stack[-3:], tag)
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _sweep(tmp_path, seeds=(0, 1, 2, 3)):  # one cell of 4 same-seed pairs: p = 1/16
    d = tmp_path / "sweep"
    for s in seeds:
        write_run(d / f"pre-ln-adamw-seed{s}", kurt=4 + s, seed=s,
                  quant={"w8a8-tensor": (5.0, 8.0 + s), "w8a8-dynamic": (5.0, 5.2)})
        write_run(d / f"op-adamw-seed{s}", arch="op", kurt=2 + 0.1 * s, seed=s,
                  quant={"w8a8-tensor": (5.1, 5.5), "w8a8-dynamic": (5.1, 5.15)})
        write_run(d / f"op-soap-seed{s}", arch="op", optimizer="soap", kurt=1.2, seed=s,
                  quant={"w8a8-tensor": (5.1, 5.2), "w8a8-dynamic": (5.1, 5.1)})
        write_run(d / f"pre-ln-lr1e-3-seed{s}", lr=1e-3, kurt=1.5, seed=s,
                  quant={"w8a8-tensor": (5.0, 5.2)})  # 4 configurations: ρ = 1 is p = 1/24
    write_run(d / "post-ln-adamw-seed0", arch="post-ln", status="diverged")
    for s in seeds:  # per-tensor Kurt and SQNR (the layer report) for the mechanism section
        run = RunFolder(d / f"pre-ln-adamw-seed{s}")
        layers = [{"name": f"blocks.{i}.mlp.fc", "kind": "linear", "kurtosis": 1.0 + i + s,
                   "mmr": 3.0 + i, "act_sqnr_db": 40.0 - 3 * i} for i in range(4)]
        write_json(run.quant_file("w8a8-tensor"), {"scheme": "w8a8-tensor", "fp_ppl": 5.0,
                                                   "quant_ppl": 8.0 + s, "layers": layers})
    return d


def test_report_command_writes_html_markdown_json(tmp_path, capsys):
    d = _sweep(tmp_path)
    out = tmp_path / "report"
    assert main(["report", str(d), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and "held" in printed

    page = (out / "report.html").read_text()
    p = _Collect()
    p.feed(page)
    p.close()
    assert not p.stack, "unclosed tags"
    text = " ".join(p.text)
    names = sorted(x.name for x in d.iterdir())
    for name in names:
        assert name in text, name
    # self-contained: every image is inline PNG data, nothing fetched
    assert len(p.imgs) >= 5
    for src in p.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert "http://" not in page and "https://" not in page and "<script" not in page

    md = (out / "report.md").read_text()
    data = json.loads((out / "results.json").read_text())
    verdicts = {c["key"]: c["verdict"] for c in data["claims"]}
    assert verdicts == {"op_vs_prenorm": "held", "lower_lr": "held", "larger_eps": "not tested",
                        "soap_vs_adamw": "held", "kurt_vs_quant": "held"}
    for c in data["claims"]:
        assert c["statement"] in md and c["statement"] in text
        assert c["summary"] in md
    for name in names:
        assert f"| {name} |" in md
    # the per-tensor test of the quantisation claim: ρ(Kurt, SQNR) = −1 in every pre-ln run
    assert "## Per tensor: Kurt against SQNR" in md
    assert "| pre-ln-adamw-seed0 | w8a8-tensor | 4 | -1.00 | -1.00 |" in md
    assert "w8a8-tensor: ρ(Kurt, SQNR) < 0 in 4 of 4 runs and 1 of 1 configurations" in md
    assert (out / "figures" / "kurt_vs_sqnr.png").read_bytes()[:8] == PNG
    assert "Per tensor: Kurt against SQNR" in text
    assert data["mechanism"]["summary"][0]["configurations_negative"] == 1
    assert "diverged" in md
    # every pair compared, with the one field in which its configurations differ
    pairs = md.split("## Pairs compared")[1].split("## Results")[0]
    assert "| op_vs_prenorm | model preset: pre-ln → op | pre-ln adamw | op adamw |" in pairs
    assert "| soap_vs_adamw | optim.name: adamw → soap |" in pairs
    assert "| lower_lr | optim.lr: 0.01 → 0.001 |" in pairs
    assert "4 of 4" in pairs and "0.062" in pairs and "| in direction |" in pairs
    assert "❔ indicative only" not in md  # 4 seeds; the one diverged post-ln run is noted
    assert "1–4 seed(s) per configuration: a comparison with fewer than 3 seeds reads" in md
    for fig in (out / "figures").glob("*.png"):
        assert fig.read_bytes()[:8] == PNG
        assert f"figures/{fig.name}" in md
    assert {f.stem for f in (out / "figures").glob("*.png")} == {
        "kurtosis_vs_step", "kurtosis_vs_lr", "kurtosis_by_optimizer", "cos_sim_vs_kurtosis",
        "quant_vs_kurtosis", "signal_propagation_vs_step", "mmr_vs_step",
        "kurt_vs_sqnr"}  # no attn_entropy
    # the table row of a run holds its numbers
    row = next(line for line in md.splitlines() if line.startswith("| op-soap-seed0 |"))
    assert "+1.96%" in row and "soap" in row


def test_one_seed_report_says_it_is_indicative(tmp_path, capsys):
    d = _sweep(tmp_path, seeds=(0,))
    out = tmp_path / "report"
    assert main(["report", str(d), "--out", str(out)]) == 0
    assert "the verdicts are indicative only" in capsys.readouterr().out.splitlines()[0]
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "1 seed(s) per configuration: the verdicts are indicative only" in md
    assert "1 seed(s) per configuration: the verdicts are indicative only" in page
    verdicts = {c["key"]: c["verdict"] for c in json.loads((out / "results.json").read_text())
                ["claims"]}
    assert verdicts["op_vs_prenorm"] == verdicts["soap_vs_adamw"] == "indicative only"
    assert "❔ indicative only" in md and 'class="inconclusive"' in page


def test_report_of_nothing_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no run folders" in capsys.readouterr().err


def _lr_sweep(d, seeds, loss, kurt):
    """Pre-LN and OP (AdamW) at lr 1e-3 and 1e-2, held-out Kurt at every evaluation."""
    for arch in ("pre-ln", "op"):
        for lr in (1e-3, 1e-2):
            for s in seeds:
                write_run(d / f"{arch}-{lr:g}-{s}", arch=arch, lr=lr, seed=s, init=1.3,
                          val_loss=loss[arch, lr] + 0.001 * (s % 100), kurt=kurt[arch, lr],
                          held_out=kurt[arch, lr] + 0.01 * (s % 100), trajectory=True)
    return d


def test_tuning_sweep_chooses_lrs_and_the_claims_run_at_them(tmp_path, capsys):
    """A tuning sweep's report writes tuning.md/.json and the frontier; a test sweep's report
    with --tuning tests the claims at the shared lr and at each configuration's own lr."""
    loss = {("pre-ln", 1e-3): 2.03, ("pre-ln", 1e-2): 2.0, ("op", 1e-3): 2.1, ("op", 1e-2): 2.3}
    kurt = {("pre-ln", 1e-3): 3.0, ("pre-ln", 1e-2): 6.0, ("op", 1e-3): 2.0, ("op", 1e-2): 4.0}
    tune = _lr_sweep(tmp_path / "tune", (100, 101), loss, kurt)
    assert main(["report", str(tune), "--out", str(tmp_path / "rt")]) == 0
    assert "lr tuning: shared lr 0.001; own lr: op adamw 0.001; pre-ln adamw 0.01" in \
        capsys.readouterr().out
    t = json.loads((tmp_path / "rt" / "tuning.json").read_text())
    assert t["shared_lr"] == 1e-3 and [c["own_lr"] for c in t["configurations"]] == [1e-3, 1e-2]
    md = (tmp_path / "rt" / "report.md").read_text()
    assert "## lr tuning" in md and "## Kurt–validation-loss frontier" in md
    assert (tmp_path / "rt" / "figures" / "frontier_block.png").read_bytes()[:8] == PNG
    front = json.loads((tmp_path / "rt" / "frontier.json").read_text())[0]
    # L* is OP's best loss (the worse of the two bests), where OP ends (Kurt 2.005); Pre-LN's
    # lowest Kurt there is on its lr 1e-3 trajectory, between the evaluations at steps 80
    # (loss 2.1305, Kurt 2.604) and 100 (2.0505, 3.005): 2.604 + 0.125 · 0.401
    assert front["matched_loss"] == pytest.approx(2.1 + 0.02 + 0.0005)
    level = front["summary"][0]
    assert level["kurt"] == {"op": pytest.approx(2.005), "pre-ln": pytest.approx(2.654125)}
    assert level["lr"] == {"op": 1e-3, "pre-ln": 1e-3}

    test = _lr_sweep(tmp_path / "test", (0, 1, 2, 3), loss, kurt)
    write_run(test / "op-wd0-0", arch="op", lr=5e-3, seed=0, extra={"optim.weight_decay": 0.0})
    rt = str(tmp_path / "rt" / "tuning.json")
    assert main(["report", str(test), "--out", str(tmp_path / "rr"), "--tuning", rt]) == 0
    sets = json.loads((tmp_path / "rr" / "results.json").read_text())["claim_sets"]
    shared, own = (sets[k] for k in sets)
    assert next(iter(sets)) == "Claims at the shared lr 0.001"
    op_shared = next(c for c in shared if c["key"] == "op_vs_prenorm")
    op_own = next(c for c in own if c["key"] == "op_vs_prenorm")
    assert {r.split("-")[1] for r in op_shared["evidence"][0]["high_runs"]} == {"ln"}
    assert all("-0.001-" in r for e in op_shared["evidence"] for r in e["low_runs"]
               + e["high_runs"])
    # own lr: Pre-LN at 1e-2 against OP at 1e-3, paired across lrs
    ev = op_own["evidence"][0]
    assert all("-0.01-" in r for r in ev["high_runs"]) and all("-0.001-" in r
                                                               for r in ev["low_runs"])
    assert op_own["test"]["matched_loss"] and op_own["test"]["pairs"] == 4
    with_tuning = (tmp_path / "rr" / "report.md").read_text()
    assert "## Claims at each configuration's own lr (op adamw 0.001; pre-ln adamw 0.01)" \
        in with_tuning
    assert ("1 run(s) of configurations the tuning did not cover, left out of the own-lr "
            "claims: op-wd0-0 (op-wd0-0 differs from the nearest tuned configuration in "
            "optim.weight_decay)") in with_tuning
    # a test sweep never chooses: no tuning.md
    assert not (tmp_path / "rr" / "tuning.md").exists()
    # no lr within the tolerance: the claims at a shared lr run at the nearest one, said so
    t.update(shared_lr=None, shared_why="none: (made up)", nearest_lr=1e-3, nearest_gap=0.05,
             nearest_worst="op adamw")
    (tmp_path / "strict.json").write_text(json.dumps(t))
    assert main(["report", str(test), "--out", str(tmp_path / "rn"), "--tuning",
                 str(tmp_path / "strict.json")]) == 0
    sets_n = json.loads((tmp_path / "rn" / "results.json").read_text())["claim_sets"]
    assert next(iter(sets_n)) == ("Claims at the nearest shared lr 0.001 (no lr has every "
                                  "configuration within 2% of its best; worst gap here +5.0%, "
                                  "op adamw)")
    assert next(iter(sets_n.values())) == shared


def test_own_lr_runs_pair_configurations_across_lrs(tmp_path, capsys):
    """A sweep whose configurations each run at their own lr (a grid's ``own_lr_from``;
    ``report --own-lr-from``): Pre-LN at 1e-2 and OP at 1e-3 are a cell of the OP claim; without
    the option they differ in optim.lr and the claim is not tested."""
    runs = tmp_path / "runs"
    for s in (0, 1, 2):
        write_run(runs / f"pre-{s}", arch="pre-ln", lr=1e-2, seed=s, init=1.3, kurt=6.0,
                  held_out=6.0 + 0.01 * s, val_loss=2.0, trajectory=True)
        write_run(runs / f"op-{s}", arch="op", lr=1e-3, seed=s, init=1.1, kurt=2.0,
                  held_out=2.0 + 0.01 * s, val_loss=2.1, trajectory=True)
    assert main(["report", str(runs), "--out", str(tmp_path / "plain")]) == 0
    claims = json.loads((tmp_path / "plain" / "results.json").read_text())["claims"]
    op = next(c for c in claims if c["key"] == "op_vs_prenorm")
    assert op["verdict"] == "not tested" and "optim.lr" in op["summary"]
    assert main(["report", str(runs), "--out", str(tmp_path / "own"), "--own-lr-from",
                 "quick-tuning"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "--own-lr-from quick-tuning" in (tmp_path / "own" / "report.md").read_text()
    claims = json.loads((tmp_path / "own" / "results.json").read_text())["claims"]
    op = next(c for c in claims if c["key"] == "op_vs_prenorm")
    # one cell of 3 seeds, all lower: p = 1/8, inconclusive (a verdict needs two cells)
    assert op["test"]["pairs"] == 3 and op["test"]["matched_loss"]
    assert op["test"]["in_direction"] == 3 and op["test"]["p"] == pytest.approx(1 / 8)
    assert op["verdict"] == "inconclusive" and "inconclusive  The OP block" in out
    assert "own lr, chosen by the `quick-tuning` tuning sweep" in \
        (tmp_path / "own" / "report.md").read_text()
