"""GGUF input: a llama.cpp ``.gguf`` file (or a folder holding exactly one) as a Hugging Face model.

Loaded through transformers' ``gguf_file=`` support (the ``gguf`` package, ``outlierlab[hf]``):
the weights are dequantised to float32, the config and the tokenizer are rebuilt from the file's
metadata, offline (``local_files_only=True``) with ``trust_remote_code=False``; the few
hyper-parameters the file states but transformers does not read for its architecture
(:data:`UNREAD`: Qwen3's head width, Qwen-MoE expert widths, ...) are set from the file. The
result is an ordinary HF causal LM, so everything that takes an HF model (``measure``,
``quantize``, ``price``, the monitor) takes a GGUF file. See docs/real-models.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from outlierlab.errors import DataError, ModelLoadError, first_line

SUFFIX = ".gguf"

# Hyper-parameters llama.cpp writes that transformers' GGUF loader does not read for the
# architecture, so the config class's default would stand (a size mismatch when loading, or
# silently different logits): config field -> key under "<general.architecture>.".
UNREAD = {
    "qwen3": {"head_dim": "attention.key_length"},
    "qwen2moe": {"moe_intermediate_size": "expert_feed_forward_length",
                 "shared_expert_intermediate_size": "expert_shared_feed_forward_length"},
    "qwen3moe": {"moe_intermediate_size": "expert_feed_forward_length"},
    "gpt2": {"n_positions": "context_length", "n_inner": "feed_forward_length"},
    "starcoder2": {"rope_theta": "rope.freq_base"},
    "stablelm": {"rope_theta": "rope.freq_base", "partial_rotary_factor": "rope.dimension_count"},
}  # fmt: skip
_ROPE = ("rope_theta", "partial_rotary_factor")  # inside rope_parameters since transformers 5


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: the file itself, or the one ``*.gguf`` in a folder that
    holds no other model (no ``config.json`` / ``model_config.json``); None otherwise.

    A folder with several ``.gguf`` files is an error naming them (which one is meant?)."""
    if path.is_file():
        return path if path.suffix.lower() == SUFFIX else None
    if not path.is_dir() or any((path / f).exists() for f in ("config.json", "model_config.json")):
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(f"{path} holds {len(found)} GGUF files ({names}); pass one file")
    return found[0] if found else None


def load(path: Path, device: str | torch.device = "cpu") -> tuple[Any, Any, int | None]:
    """Load the GGUF file ``path`` offline: ``(model in eval mode, tokenizer, context)``."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            "loading a GGUF file needs transformers and gguf: pip install 'outlierlab[hf]'"
        ) from exc
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelLoadError(f"loading {path} needs the gguf package: pip install 'outlierlab[hf]'")
    with _quiet_loading():  # the CLI's stderr is for one-line errors
        return _load(transformers, path, device)


def _load(transformers: Any, path: Path, device: str | torch.device):
    from outlierlab.hf import TransformersTokenizer

    opts = {"gguf_file": path.name, "local_files_only": True, "trust_remote_code": False}
    folder = str(path.parent)
    try:
        if unread := unread_config(path):
            config = transformers.AutoConfig.from_pretrained(folder, **opts)
            opts["config"] = _with(config, unread)
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, output_loading_info=True, **opts
        )
        opts.pop("config", None)
    except Exception as exc:  # gguf and transformers raise many types for bad or unknown files
        raise ModelLoadError(f"cannot load the GGUF file {path}: {first_line(exc)}") from exc
    if missing := sorted(info.get("missing_keys") or ()):  # left random: no model at all
        raise ModelLoadError(
            f"cannot load the GGUF file {path}: transformers found no weights in it for "
            f"{len(missing)} {type(model).__name__} parameters ({', '.join(missing[:3])}, ...)"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder, **opts)
    except Exception as exc:
        raise DataError(f"{path} holds no usable tokenizer: {first_line(exc)}") from exc
    model.to(device).eval()
    ctx = getattr(model.config, "max_position_embeddings", None)
    return model, TransformersTokenizer(tok), ctx if isinstance(ctx, int) else None


def unread_config(path: Path) -> dict[str, Any]:
    """The config fields of :data:`UNREAD` that the GGUF file ``path`` states (a rotary width
    as ``partial_rotary_factor``, its fraction of the head)."""
    meta = _metadata(path)
    arch = meta.get("general.architecture")
    keys = {name: f"{arch}.{key}" for name, key in UNREAD.get(arch, {}).items()}
    out = {name: meta[key] for name, key in keys.items() if key in meta}
    if "partial_rotary_factor" in out:
        head = meta[f"{arch}.embedding_length"] / meta[f"{arch}.attention.head_count"]
        out["partial_rotary_factor"] /= head
    return out


def _metadata(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of the GGUF file ``path``."""
    try:  # transformers 5's reader skips the vocabulary arrays: ~0.1 s where gguf's takes ~10 s
        from transformers.integrations.gguf import read_gguf_metadata
    except (ImportError, AttributeError):
        read_gguf_metadata = None
    if read_gguf_metadata is not None:
        return read_gguf_metadata(str(path))[0]
    import gguf

    out = {}
    for key, field in gguf.GGUFReader(path).fields.items():
        if len(field.types) == 1 and field.data:  # not an array
            value = field.parts[field.data[0]]
            string = field.types[0] == gguf.GGUFValueType.STRING
            out[key] = bytes(value).decode("utf-8") if string else value.tolist()[0]
    return out


def _with(config: Any, values: dict[str, Any]) -> Any:
    """``config`` with ``values`` set (rotary ones in ``rope_parameters`` where it has them)."""
    rope = getattr(config, "rope_parameters", None)
    for name, value in values.items():
        if name in _ROPE and isinstance(rope, dict):
            rope[name] = value
        if name not in _ROPE or hasattr(config, name) or not isinstance(rope, dict):
            setattr(config, name, value)
    return config


class _quiet_loading:
    """Loading without noise and without reading the file three times.

    - No progress bars: transformers' own (its logging switch) and the ``tqdm`` bar it draws
      while dequantising GGUF tensors, which ignores that switch (its module's ``tqdm`` is
      swapped for a disabled one meanwhile).
    - One parse of the file: transformers builds a ``gguf.GGUFReader`` for the config, the
      tokenizer and the weights, each parsing every metadata field (SmolLM2's 49 152-token
      vocabulary and merges: most of the load time); meanwhile ``gguf.GGUFReader`` returns one
      reader per path (read-only, memory-mapped), and ``gguf.get_tensor_name_map``, rebuilt
      for every tensor, is memoised."""

    def __enter__(self) -> None:
        import functools

        import gguf
        from transformers import modeling_gguf_pytorch_utils as mod
        from transformers.utils import logging as hf_logging

        self._bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        self._mod, self._old = mod, getattr(mod, "tqdm", None)
        if self._old is not None:
            mod.tqdm = functools.partial(self._old, disable=True)
        self._gguf = gguf
        self._reader, self._names = gguf.GGUFReader, gguf.get_tensor_name_map
        readers: dict[tuple[str, str], Any] = {}
        reader_cls = self._reader

        def shared_reader(path: Any, mode: str = "r") -> Any:
            key = (str(path), mode)
            if key not in readers:
                readers[key] = reader_cls(path, mode)
            return readers[key]

        gguf.GGUFReader = shared_reader
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(self._names)

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        self._gguf.GGUFReader, self._gguf.get_tensor_name_map = self._reader, self._names
        if self._old is not None:
            self._mod.tqdm = self._old
        if self._bars:
            hf_logging.enable_progress_bar()
