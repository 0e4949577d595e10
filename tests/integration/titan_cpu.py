"""A real torchtitan (0.3) ``Trainer`` on CPU with outlierlab attached: run as a script by
tests/integration/test_torchtitan_real.py, in a fresh process (torchtitan is patched here and
initialises a process group).

    python titan_cpu.py OUT_FOLDER [--compile BACKEND] [--accumulate]

writes OUT_FOLDER/result.json: the monitor's history, hook counts, TensorBoard tags.

torchtitan 0.3 does not run on a CPU-only torch as shipped; three patches, each at the place in
torchtitan's source it answers (docs/integrations.md, "torchtitan"):

1. ``torchtitan/tools/utils.py`` picks ``"cuda"`` when no accelerator is found: device type
   ``"cpu"`` and a stand-in device module (torch.cpu plus the CUDA-only calls its trainer and
   ``DeviceMemoryMonitor`` make), set before the modules that copy these names are imported.
2. ``models/common/attention.py``: FlexAttention has no backward on CPU
   (``flex_attention.py``'s ``_validate_device``); the same attention from the BlockMask's dense
   mask through ``F.scaled_dot_product_attention``.
3. ``distributed/utils.py`` calls ``torch.distributed.set_timeout``, which torch 2.13 lacks;
   its private ``_set_pg_timeout`` has the same signature.

Its debug config reads a tokenizer and a ``c4_test`` data set from torchtitan's repository,
not its wheel: a byte-level BPE tokenizer and a JSON-lines data set are built here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import tempfile
import types
from pathlib import Path

import torch

for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
             "MASTER_ADDR": "127.0.0.1"}.items():  # fmt: skip
    os.environ.setdefault(k, v)


class CpuDeviceModule(types.ModuleType):
    """torchtitan's ``device_module`` on CPU: torch.cpu, and the calls torch.cpu lacks."""

    def __init__(self) -> None:
        super().__init__("titan_cpu_device")

    def __getattr__(self, name: str):
        return getattr(torch.cpu, name)

    def set_device(self, device) -> None:
        pass

    def current_device(self) -> int:
        return 0

    def get_device_name(self, device=None) -> str:
        return "cpu"

    def get_device_properties(self, device=None):
        return types.SimpleNamespace(name="cpu", total_memory=1 << 34)

    def reset_peak_memory_stats(self, device=None) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def memory_stats(self, device=None) -> dict:
        return {"active_bytes.all.peak": 0, "reserved_bytes.all.peak": 0,
                "num_alloc_retries": 0, "num_ooms": 0}  # fmt: skip


def patch_torchtitan() -> None:
    """The three patches of the module docstring; before ``torchtitan.trainer`` is imported."""
    import torch.nn.functional as F
    import torchtitan.tools.utils as tt_utils
    from torch.nn.attention.flex_attention import AuxOutput, create_mask

    assert "torchtitan.trainer" not in sys.modules, "patch before importing the trainer"
    tt_utils.device_type, tt_utils.device_module = "cpu", CpuDeviceModule()

    import torchtitan.models.common.attention as tt_attn

    def flex_on_cpu(q, k, v, *, score_mod, block_mask, scale, enable_gqa, return_aux,
                    kernel_options):  # fmt: skip
        if score_mod is not None or (return_aux is not None and return_aux.lse):
            raise NotImplementedError("flex_on_cpu: no score_mod, no log-sum-exp")
        mask = create_mask(block_mask.mask_mod, q.shape[0], 1, q.shape[-2], k.shape[-2],
                           device=q.device)  # fmt: skip
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                             enable_gqa=enable_gqa)  # fmt: skip
        return out, AuxOutput(lse=None)

    tt_attn.FlexAttention.compiled_flex_attn = staticmethod(flex_on_cpu)
    if not hasattr(torch.distributed, "set_timeout"):
        from torch.distributed.distributed_c10d import _set_pg_timeout

        torch.distributed.set_timeout = _set_pg_timeout


def make_assets(root: Path) -> None:
    """A byte-level BPE tokenizer (vocab 2000 < the debug model's 2048) with bos/eos, and a
    JSON-lines text data set, both from Python's standard-library sources (offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    lib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.strip() for name in ("argparse.py", "functools.py", "textwrap.py", "difflib.py")
             for p in (lib / name).read_text().split("\n\n") if len(p.strip()) > 200]  # fmt: skip
    (root / "c4_test").mkdir(parents=True)
    with open(root / "c4_test" / "c4_sample.json", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|begin_of_text|>", "<|end_of_text|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=special, initial_alphabet=alphabet))
    (root / "tokenizer").mkdir()
    tok.save(str(root / "tokenizer" / "tokenizer.json"))
    (root / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": special[0], "eos_token": special[1]}))


def hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--compile", default=None, help="torchtitan's compile.backend (e.g. aot_eager)")
    ap.add_argument("--accumulate", action="store_true", help="2 micro-batches per step")
    args = ap.parse_args()
    patch_torchtitan()
    from torchtitan.models.llama3.config_registry import llama3_debugmodel
    from torchtitan.trainer import Trainer

    from outlierlab.integrations.torchtitan import attach

    torch.manual_seed(0)
    assets = Path(tempfile.mkdtemp(prefix="titan_assets_"))
    make_assets(assets)
    cfg = llama3_debugmodel()  # dim 256, 6 layers, 16 heads, vocab 2048
    cfg.hf_assets_path = str(assets / "tokenizer")
    cfg.dataloader.dataset_path = str(assets / "c4_test")
    cfg.dump_folder = str(args.out / "dump")
    cfg.training.local_batch_size, cfg.training.seq_len, cfg.training.steps = 2, 64, 4
    if args.accumulate:
        cfg.training.global_batch_size = 4
    cfg.training.disable_cuda_graphs = True
    cfg.lr_scheduler.warmup_steps = 1
    cfg.checkpoint.enable = False
    cfg.activation_checkpoint = None
    cfg.compile.enable = args.compile is not None
    if args.compile:
        cfg.compile.backend = args.compile
    cfg.metrics.enable_tensorboard, cfg.metrics.log_freq = True, 1
    trainer = Trainer(cfg)
    model = trainer.model_parts[0]
    before = hooks(model)
    mon = attach(trainer, every=2)
    attached = hooks(model)
    trainer.train()
    trainer.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p.parent for p in (args.out / "dump").rglob("events.out.tfevents.*")]
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tb = {t: [e.step for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]
          if t.startswith("outliers/")}  # fmt: skip
    result = {"history": mon.history, "hooks": [before, attached, hooks(model)],
              "tokens_per_step": max(cfg.training.global_batch_size, 2) * 64, "tensorboard": tb}
    (args.out / "result.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
