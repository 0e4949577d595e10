"""The report: HTML parses, is self-contained, names every run; Markdown has the same claims
and table; figures are real PNGs."""

import base64
import json
from html.parser import HTMLParser

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
