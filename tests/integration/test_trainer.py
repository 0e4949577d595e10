"""The Trainer: callbacks see every step, a stopped-and-resumed run logs exactly the metrics of
an uninterrupted one, rank-0 mistakes keep their type."""

from __future__ import annotations

import json

import pytest
from test_train import TINY, make_corpus

from outlierlab import config as C
from outlierlab.errors import ConfigError
from outlierlab.run_folder import RunFolder
from outlierlab.train import Callback, Trainer, train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"), files=20)


class StopAt(Callback):
    """Ask the trainer to stop (as SIGTERM does) during step ``at``; record events; with
    ``mark`` add a field to step 3's row."""

    def __init__(self, at: int | None = None, mark: bool = False) -> None:
        self.at, self.mark, self.events = at, mark, []

    def on_train_begin(self, trainer):
        self.events.append(("begin", trainer.step))

    def on_step_begin(self, trainer, step):
        self.events.append(("step", step))
        if step == self.at:
            trainer.stop.requested = "SIGTERM"

    def on_step_end(self, trainer, step, row):
        if self.mark and step == 3:
            row["mine"] = 1.5  # logged at this step although log_every is 5

    def on_log(self, trainer, row):
        self.events.append(("log", row["step"]))

    def on_save(self, trainer, step):
        self.events.append(("save", step))

    def on_train_end(self, trainer, status):
        self.events.append(("end", status))


# 16 × 32 = 512 tokens per forward: more than mmr_max_tokens (256), so Eq. 2 is subsampled
RESUME = [*TINY, "train.batch_size=16", "train.steps=12", "train.log_every=1",
          "log.kurtosis_every=3", "log.profile_every=5", "train.eval_every=4",
          "train.ckpt_every=0"]  # fmt: skip


def test_stop_and_resume_logs_identical_metrics(corpus, cache_dir, tmp_path):
    ref = train(C.load("tiny", overrides=[*RESUME, f"data.source={corpus}",
                                          f"out={tmp_path / 'ref'}"]), progress=False)  # fmt: skip
    out = tmp_path / "cut"
    cb = StopAt(at=6)
    first = train(C.load("tiny", overrides=[*RESUME, f"data.source={corpus}", f"out={out}"]),
                  progress=False, callbacks=[cb])  # fmt: skip
    assert (first.status, first.step, first.exit_code) == ("interrupted", 6, 130)
    assert ("save", 6) in cb.events and cb.events[-1] == ("end", "interrupted")
    res = train(C.resume_config(out), resume=True, progress=False)
    assert ref.status == res.status == "finished" and res.step == 12

    a, b = RunFolder(tmp_path / "ref").metrics, RunFolder(out).metrics
    # step 0 (before the first update) is logged once, by the run that started
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(0, 13))
    assert sum("mmr" in r for r in a) == 5  # steps 0, 3, 6, 9, 12
    assert [r["step"] for r in a if "massive_max" in r] == [5, 10]  # log.profile_every
    # the held-out Kurt on the validation windows at each evaluation and at the end
    assert [r["step"] for r in a if "val_kurtosis_mean" in r] == [0, 4, 8, 12]
    for ra, rb in zip(a, b):
        ra.pop("tokens_per_s", None), rb.pop("tokens_per_s", None)
        assert ra == rb  # every field, MMR's subsample included, bit for bit


def test_callback_events_and_rows(corpus, cache_dir, tmp_path):
    cb = StopAt(mark=True)
    res = train(C.load("tiny", overrides=[*TINY, f"data.source={corpus}", "train.steps=6",
                                          "train.log_every=5", f"out={tmp_path / 'r'}"]),
                progress=False, callbacks=[cb])  # fmt: skip
    assert res.status == "finished"
    assert cb.events == [("begin", 0), ("log", 0), *[("step", s) for s in (1, 2, 3)], ("log", 3),
                         ("step", 4), ("step", 5), ("log", 5), ("step", 6), ("log", 6),
                         ("save", 6), ("end", "finished")]  # fmt: skip
    rows = {r["step"]: r for r in RunFolder(tmp_path / "r").metrics}
    assert sorted(rows) == [0, 3, 5, 6] and rows[3]["mine"] == 1.5


def test_rank0_mistake_keeps_its_type_and_leaves_no_status(corpus, cache_dir, tmp_path):
    out = tmp_path / "r"
    cfg = C.load("tiny", overrides=[*TINY, f"data.source={corpus}", "train.steps=2",
                                    f"out={out}"])  # fmt: skip
    train(cfg, progress=False)
    before = (out / "status.json").read_text()
    with pytest.raises(ConfigError, match="already holds a run"):
        Trainer(cfg, progress=False)
    assert json.loads((out / "status.json").read_text()) == json.loads(before)


def test_benchmark_interleaver_drives_real_trainers(corpus, cache_dir, tmp_path):
    import importlib
    import sys
    from pathlib import Path

    bench = str(Path(__file__).resolve().parents[2] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        common = importlib.import_module("_common")
    finally:
        sys.path.remove(bench)
    cfgs = {n: C.load("tiny", overrides=[*TINY, f"data.source={corpus}", f"out={tmp_path / n}",
                                         f"log.kurtosis_every={k}"])
            for n, k in (("off", 0), ("every2", 2))}  # fmt: skip
    li = common.LoopInterleaver(cfgs, block=2, rounds=2, warmup_blocks=1)
    t = li.run()
    assert [len(t.seconds[n]) for n in cfgs] == [2, 2]
    assert all(len(v) == 1 for v in li.warmup_seconds.values())
    assert all(r.status == "finished" and r.step == 7 for r in li.results.values())
    kurt = [r["step"] for r in RunFolder(tmp_path / "every2").metrics if "mmr" in r]
    assert kurt == [0, 2, 4, 6]  # step 0: before the first update


def test_replay_measures_after_the_step_without_hooks_during_training(corpus, cache_dir,
                                                                      tmp_path):  # fmt: skip
    from outlierlab.measuring import MeasureEvery

    hooked = []

    class NoHooks(Callback):
        def on_step_begin(self, trainer, step):
            hooked.append(any(m._forward_hooks or m._forward_pre_hooks
                              for m in trainer.model.modules()))  # fmt: skip

    cfg = C.load("tiny", overrides=[*TINY, f"data.source={corpus}", "train.steps=4",
                                    "train.log_every=4", f"out={tmp_path / 'r'}"])  # fmt: skip
    train(cfg, progress=False, callbacks=[NoHooks(), MeasureEvery(2, replay=True)])
    rows = {r["step"]: r for r in RunFolder(tmp_path / "r").metrics}
    assert sorted(rows) == [0, 2, 4] and all("mmr" in rows[s] for s in (2, 4))
    assert all(rows[s]["kurtosis_max"] >= 1.0 for s in (2, 4))
    assert hooked == [False] * 4  # the compiled graph would never see a hook


class MaxAbs(Callback):
    """After each update, max |x| of the embedding output over this step's batch, computed
    directly (a hook on ``embed_out``), to compare with what ``log.profile_every`` logged."""

    def __init__(self) -> None:
        self.expected: dict[int, float] = {}
        self.logged: dict[int, dict] = {}

    def on_step_end(self, trainer, step, row):
        import torch

        seen = []
        h = trainer.model.embed_out.register_forward_hook(
            lambda m, a, o: seen.append(o.detach().abs().max().item()))
        trainer.model.eval()
        with torch.no_grad():
            trainer.model(torch.cat(trainer.local_micro_batches()))
        trainer.model.train()
        h.remove()
        self.expected[step] = max(seen)

    def on_log(self, trainer, row):
        if "massive_max" in row:
            self.logged[row["step"]] = row


def test_profile_every_logs_the_massive_activation_fields(corpus, cache_dir, tmp_path):
    cb = MaxAbs()
    train(C.load("tiny", overrides=[*TINY, f"data.source={corpus}", "train.steps=4",
                                    "log.profile_every=2", "log.kurtosis_every=0",
                                    f"out={tmp_path / 'p'}"]),
          progress=False, callbacks=[cb])  # fmt: skip
    assert sorted(cb.logged) == [2, 4]
    n_layer = C.load("tiny").model.n_layer
    for step, row in cb.logged.items():
        assert row["massive_max"]["embed.resid_post"] == pytest.approx(cb.expected[step])
        assert set(row["massive_max"]) == {"embed.resid_post",
                                           *(f"blocks.{i}.resid_post" for i in range(n_layer))}
        assert all(v >= 1.0 for v in row["massive_ratio"].values())
        assert len(row["sink_share"]) == n_layer
        assert all(0.0 <= v <= 1.0 for v in [*row["sink_share"].values(),
                                             *row["sink_mass"].values()])
