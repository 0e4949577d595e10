"""GGUF input: a llama.cpp ``.gguf`` file (or a folder holding exactly one) as a Hugging Face model.

Loaded through transformers' ``gguf_file=`` support (the ``gguf`` package, ``outlierlab[hf]``):
the weights are dequantised to float32, the config and the tokenizer are rebuilt from the file's
metadata, offline (``local_files_only=True``) with ``trust_remote_code=False``; the few
hyper-parameters the file states but transformers does not read for its architecture
(:data:`UNREAD`: Qwen3's head width, Qwen-MoE expert widths, ...) are set from the file. The
result is an ordinary HF causal LM, so everything that takes an HF model (``measure``,
``quantize``, ``price``, the monitor) takes a GGUF file. See docs/real-models.md.

The conversion (parsing the file's vocabulary, dequantising every tensor) takes most of a
command's loading time and gives the same model each time, so its result is kept as an
ordinary HF folder (safetensors, config.json, tokenizer.json) under
``$OUTLIERLAB_CACHE/gguf`` (default ``~/.cache/outlierlab/gguf``), keyed by the file's path, size
and modification time and the transformers version; the next command loads that folder
instead (:func:`cached`). ``OUTLIERLAB_GGUF_CACHE=off`` turns it off; models over
:data:`CACHE_MAX_BYTES` of float32 weights are not kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from outlierlab.data.config import default_cache_root
from outlierlab.errors import DataError, ModelLoadError, first_line
from outlierlab.run_folder import holds_model_config

SUFFIX = ".gguf"
CACHE_ENV = "OUTLIERLAB_GGUF_CACHE"  # "off" (or 0/no/false): convert on every load
CACHE_MAX_BYTES = 8 * 2**30  # float32 weights above this (a ~2B model) are not kept
SOURCE_FILE = "outlierlab-gguf-source.json"  # in a cache entry: which file it was made from

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
    if not path.is_dir() or holds_model_config(path):
        return None
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() == SUFFIX)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(f"{path} holds {len(found)} GGUF files ({names}); pass one file")
    return found[0] if found else None


def load(
    path: Path, device: str | torch.device = "cpu"
) -> tuple[Any, Any, int | None, Path | None]:
    """Load the GGUF file ``path`` offline: ``(model in eval mode, tokenizer, context, the
    cache entry its conversion is kept in or None)``."""
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(
            "loading a GGUF file needs transformers and gguf: pip install 'outlierlab[hf]'"
        ) from exc
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelLoadError(f"loading {path} needs the gguf package: pip install 'outlierlab[hf]'")
    entry = cached(path)
    if entry is not None and entry.is_dir():
        try:
            with _quiet_loading():
                return (*_load_entry(transformers, entry, device), entry)
        except Exception as exc:  # a damaged entry: convert again, replace it
            print(f"note: GGUF cache entry {entry} unreadable ({first_line(exc)}); "
                  "converting again", file=sys.stderr)
            shutil.rmtree(entry, ignore_errors=True)
    with _quiet_loading():  # the CLI's stderr is for one-line errors
        model, tok, ctx = _load(transformers, path, device)
    kept = entry is not None and _store(entry, path, model, tok.tok)
    return model, tok, ctx, entry if kept else None


def _save_hf(model: Any, tok: Any, folder: Path) -> None:
    """``model`` and ``tok`` as an HF folder. transformers refuses ``save_pretrained`` on a model
    loaded from GGUF (it counts as quantised, although its weights are plain float32 by now), so
    the config is written without its ``quantization_config`` and the weights with safetensors'
    ``save_model`` (tied weights stored once, as ``from_pretrained`` expects)."""
    import copy

    from safetensors.torch import save_model

    config = copy.deepcopy(model.config)
    for name in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, name):
            delattr(config, name)
    config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(folder)
    # Loaded back through its family's class, a tokenizer rebuilds its model from the saved
    # vocabulary with that class's assumptions (Gemma's: an unknown token the file may lack);
    # the generic class reads tokenizer.json as written: the tokenizer that was converted.
    tok_config = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").is_file() and tok_config.is_file():
        settings = json.loads(tok_config.read_text())
        settings["tokenizer_class"] = "PreTrainedTokenizerFast"
        tok_config.write_text(json.dumps(settings, indent=2) + "\n")


def cached(path: Path) -> Path | None:
    """Where the converted model of the GGUF file ``path`` is (or would be) kept; None when the
    cache is off (``$OUTLIERLAB_GGUF_CACHE``). The key changes when the file changes (path, size,
    modification time) or transformers does (its conversion may)."""
    if os.environ.get(CACHE_ENV, "").strip().lower() in ("off", "0", "no", "false"):
        return None
    import transformers

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|transformers {transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_root() / "gguf" / f"{path.stem}-{digest}"


def _load_entry(transformers: Any, entry: Path, device: str | torch.device):
    """A cache entry, loaded as the HF folder it is (offline, no remote code)."""
    from outlierlab.hf import TransformersTokenizer

    json.loads((entry / SOURCE_FILE).read_text())  # written last by _store: entry complete
    opts = {"local_files_only": True, "trust_remote_code": False}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(entry), dtype=torch.float32, **opts
    )
    tok = transformers.AutoTokenizer.from_pretrained(str(entry), **opts)
    model.to(device).eval()
    ctx = getattr(model.config, "max_position_embeddings", None)
    return model, TransformersTokenizer(tok), ctx if isinstance(ctx, int) else None


def _store(entry: Path, path: Path, model: Any, tok: Any) -> bool:
    """Keep the converted model as ``entry`` (a temporary folder renamed into place, so a crash
    or a concurrent command never leaves half an entry); whether the entry is there now. A
    failure only costs the next load the conversion again."""
    size = sum(p.numel() * 4 for p in model.parameters())
    if size > CACHE_MAX_BYTES:
        return False
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=entry.parent))
        try:
            _save_hf(model, tok, tmp)
            st = path.stat()
            source = {"gguf": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
            os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except Exception as exc:  # read-only or full disk, an unsavable tokenizer,
        # another command's entry already in place: the load itself has succeeded
        if not (entry / SOURCE_FILE).is_file():
            print(f"note: cannot keep the converted GGUF model in {entry.parent}: "
                  f"{first_line(exc)}", file=sys.stderr)
            return False
    return True


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
