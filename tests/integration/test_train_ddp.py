"""DDP on CPU (gloo): 2 ranks × batch B = 1 process × batch B × grad_accum 2, step by step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_train import TINY, make_corpus

from outlierlab import config as C
from outlierlab.run_folder import RunFolder
from outlierlab.train import train

MONITOR_FIELDS = {"kurtosis", "mmr", "cos_sim", "kurtosis_authors", "corr_authors",
                  "kurtosis_mean", "kurtosis_max", "attn_entropy", "attn_entropy_min"}


def rank_errors(stderr: str) -> str:
    """What a failed torchrun printed that says why: the ranks' own error lines (a Python
    exception, a C++ ``terminate``/``what()``) before torchrun's summary, then the summary's end."""
    why = [line for line in stderr.splitlines()
           if any(k in line for k in ("Error", "error:", "terminate", "what()", "Abort"))]
    return "\n".join(why[:40]) + "\n...\n" + stderr[-1500:]


@pytest.mark.slow
def test_two_ranks_match_one_process_with_accumulation(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    common = [*TINY, f"data.source={corpus}", "train.batch_size=4", "train.steps=12",
              "train.log_every=1", "log.kurtosis_every=6", "train.eval_every=6",
              "train.ckpt_every=6"]
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "outlierlab", "train", "--preset", "tiny", *common, f"out={ddp}"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, rank_errors(proc.stderr)
    assert proc.stdout.count("step 12/12") == 1  # only rank 0 prints

    one = tmp_path / "one"
    train(C.load("tiny", overrides=[*common, "train.grad_accum=2", f"out={one}"]), progress=False)

    a, b = RunFolder(one).metrics, RunFolder(ddp).metrics
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(0, 13))
    assert a[1]["tokens"] == b[1]["tokens"] == 2 * 4 * 32  # global batch × seq_len
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        if ra["step"]:  # step 0 has no update, so no gradient
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4, abs=1e-6)
        if "val_loss" in ra:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
        # every logged monitor field, training (all-reduced over both ranks' micro-batches) and
        # held-out (val_*): subsamples are numbered by global micro-batch / evaluation group,
        # so MMR, cos-sim and attention entropy match too, not only Kurt
        fields = [k for k in ra if k.removeprefix("val_") in MONITOR_FIELDS]
        if ra["step"] in (6, 12):
            assert {"kurtosis", "mmr", "cos_sim", "attn_entropy", "val_mmr"} <= set(fields)
        assert set(fields) == {k for k in rb if k.removeprefix("val_") in MONITOR_FIELDS}
        for key in fields:
            va, vb = ra[key], rb[key]
            if isinstance(va, dict):
                assert va.keys() == vb.keys(), key
                for k, v in va.items():
                    assert vb[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (key, k)
            else:
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-6), key
    wa, wb = load_file(one / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-12", "step-6"]



@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_fsdp_killed_on_one_process_resumes_on_two_ranks_matching_one_process(tmp_path,
                                                                              cache_dir):
    """``train.parallel=fsdp``: a 1-process run (not sharded, DCP checkpoints) killed with
    SIGKILL after its step-4 checkpoint resumes on 2 sharded ranks (gloo) with the same global
    batch, and its losses, monitor fields and exported final weights match an uninterrupted
    1-process run."""
    import signal
    import time

    corpus = make_corpus(tmp_path / "corpus")
    common = [*TINY, f"data.source={corpus}", "train.log_every=1", "log.kurtosis_every=6",
              "train.eval_every=6", "train.ckpt_every=4", "train.parallel=fsdp",
              "train.batch_size=4", "optim.schedule=constant", "optim.warmup=0"]  # fmt: skip
    # (a constant lr: the killed run asks for 400 steps, and the schedule follows train.steps)
    one = tmp_path / "one"
    ref = train(C.load("tiny", overrides=[*common, "train.steps=12", "train.grad_accum=2",
                                          f"out={one}"]), progress=False)  # fmt: skip
    assert ref.status == "finished"

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "outlierlab", "train", "--preset", "tiny", *common,
         "train.steps=400", "train.grad_accum=2", f"out={run}"],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    deadline = time.time() + 600  # a loaded machine takes minutes to import torch
    while not (run / "checkpoints" / "step-4" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints" / "step-4" / "dcp" / ".metadata").is_file()

    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "outlierlab", "train", "--resume", str(run), "train.steps=12",
         "train.grad_accum=1"],
        capture_output=True, text=True, env=env, timeout=900)  # fmt: skip
    assert two.returncode == 0, rank_errors(two.stderr)
    a, b = RunFolder(one).metrics, RunFolder(run).metrics
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(13))
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        for k in ("grad_norm", "val_loss", "kurtosis_mean", "val_kurtosis_mean", "mmr"):
            assert (k in ra) == (k in rb), (ra["step"], k)
            if k in ra and not isinstance(ra[k], dict):
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-6), (ra["step"], k)
    ckpt = run / "checkpoints" / "step-12"
    assert (ckpt / "dcp" / ".metadata").is_file() and (ckpt / "state.json").is_file()
    assert len(list((ckpt / "dcp").glob("*.distcp"))) == 2  # one file per rank
    wa, wb = load_file(one / "model.safetensors"), load_file(run / "model.safetensors")
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4

def test_fsdp_refuses_optimisers_that_need_whole_matrices():
    for name in ("soap", "shampoo", "orthoadam"):
        with pytest.raises(C.ConfigError, match=rf"optim.name={name} cannot train with "
                                                r"train.parallel=fsdp.*allowed with fsdp"):
            C.load("tiny", overrides=["train.parallel=fsdp", f"optim.name={name}"])
    C.load("tiny", overrides=["train.parallel=fsdp", "optim.name=muon"])


def _sharded_steps(rank, world, init, names, out):
    """Worker: for each optimiser, 3 TrainSteps of a tiny GPT sharded over ``world`` ranks;
    rank 0 saves the full weights to ``out/{name}.pt``."""
    import torch
    import torch.distributed as tdist

    from outlierlab.model import GPT, GPTConfig
    from outlierlab.optim import OptimConfig, build_optimizer
    from outlierlab.train import TrainStep, distributed, fsdp

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dist = distributed.Dist(rank, world, rank, torch.device("cpu"))
    for name in names:
        torch.manual_seed(0)
        model = fsdp.shard(GPT(GPTConfig.preset("pre-ln", n_layer=2, d_model=32, n_head=2,
                                                 seq_len=16, vocab_size=64)), None, dist.device)
        opt = build_optimizer(model, OptimConfig(name=name, lr=1e-2))
        step = TrainStep(model, opt, micro=2, accum=1, clip=1.0, dist=dist)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            w = torch.randint(0, 64, (4, 17), generator=g)
            assert step(w[:, :-1].contiguous(), w[:, 1:].contiguous()).finite
        full = fsdp.full_state_dict(model)
        if rank == 0:
            torch.save(full, out / f"{name}.pt")
    tdist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_shardable_optimisers_match_one_process_on_fsdp_shards(tmp_path):
    """AdamW, AdaFactor, Muon and SGD step on FSDP2 shards (DTensors) as on whole matrices:
    2 sharded ranks × 2 sequences = 1 process accumulating 2 × 2, weights to 1e-5."""
    import torch
    import torch.multiprocessing as mp

    from outlierlab.model import GPT, GPTConfig
    from outlierlab.optim import OptimConfig, build_optimizer
    from outlierlab.train import TrainStep
    from outlierlab.train.fsdp import SHARDABLE

    mp.spawn(_sharded_steps, args=(2, f"file://{tmp_path / 'store'}", SHARDABLE, tmp_path),
             nprocs=2)  # fmt: skip
    for name in SHARDABLE:
        torch.manual_seed(0)
        model = GPT(GPTConfig.preset("pre-ln", n_layer=2, d_model=32, n_head=2, seq_len=16,
                                     vocab_size=64))  # fmt: skip
        step = TrainStep(model, build_optimizer(model, OptimConfig(name=name, lr=1e-2)),
                         micro=2, accum=2, clip=1.0)  # fmt: skip
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            w = torch.randint(0, 64, (4, 17), generator=g)
            step(w[:, :-1].contiguous(), w[:, 1:].contiguous())
        sharded = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        for k, v in model.state_dict().items():
            assert torch.allclose(sharded[k], v, atol=1e-5, rtol=1e-4), (name, k)
