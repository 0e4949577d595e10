"""Where to measure a model: its residual stream and attention layers, found from its structure.

One discovery (:func:`discover`) serves every consumer: the :class:`~outlierlab.monitor.
OutlierMonitor` (``measure``, the training callbacks, the library), the massive-activation
profile (``measure --profile``, ``price``), residual-stream quantisation and the commands'
structure check right after loading. The points (docs/ARCHITECTURE.md, docs/science.md §1
"Where"):

- ``embed.resid_post``: the residual stream as the first block sees it (HF ``hidden_states[0]``:
  positions, scaling and embedding norms included), i.e. the input of block 0;
- ``blocks.{i}.resid_post``: the output of block i, before any final norm;
- ``blocks.{i}.attn``: the attention probabilities of block i, only when asked for
  (:class:`AttentionPoint`).

How the blocks are found, in order (``Structure.source`` says which):

1. ``model.residual_points()`` / ``attention_points()`` (outlierlab's GPT, or any model that
   defines them);
2. :data:`OVERRIDES`, for the few families whose structure the rules below get wrong;
3. Hugging Face models: in the decoder (``get_decoder()``, else ``base_model``), the
   ``nn.ModuleList`` whose length is ``config.num_hidden_layers`` (the text config's, for
   multimodal models), preferring the one whose elements are the class transformers records
   ``hidden_states`` from (``_can_record_outputs``); encoders (BERT, RoBERTa, ModernBERT) too;
4. anything else: the longest ``nn.ModuleList`` of blocks, or ``nn.ModuleDict`` of blocks keyed
   ``"0"``, ``"1"``, … in order (torchtitan's decoders: ``layers``) (said so: ``"guessed"``).

Attention probabilities come the way transformers exposes them: the module class it records
``attentions`` from (``_can_record_outputs``; else the block's first module whose class name
ends in ``Attention``), whose output element 1 holds them under eager attention. Asking for them
switches an HF model to eager attention for the duration (the same function as SDPA up to
rounding) and back.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ConfigError


class StructureError(ConfigError):
    """The model's residual stream could not be found (no blocks)."""


@dataclass(frozen=True)
class Point:
    """A measurement point: the ``output`` of ``module``, or its first ``input``."""

    name: str
    module: nn.Module
    kind: str = "output"


# model_type → overrides of the rules (relative to the model): "blocks" (module path of the
# block list). Only for families the rules get wrong; each says why.
OVERRIDES: dict[str, dict[str, str]] = {}


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP / FSDP (``.module``) or ``torch.compile`` (``._orig_mod``)."""
    for attr in ("_orig_mod", "module"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return unwrap(inner)
    return model


def is_hf(model: nn.Module) -> bool:
    """Whether ``model`` is a ``transformers`` model (no transformers import)."""
    return any(c.__module__.startswith("transformers.") for c in type(unwrap(model)).__mro__)


@dataclass
class Structure:
    """The residual stream of a model: its blocks (in order), embedding and final norm, and the
    attention module of each block that has one. ``source`` says how it was found."""

    blocks: list[nn.Module]
    blocks_name: str
    source: str
    embed_point: Point | None = None
    embedding: nn.Module | None = None
    final_norm: str | None = None
    attention: dict[str, tuple[nn.Module, int]] = field(default_factory=dict)
    extra_points: list[Point] = field(default_factory=list)  # residual_points() beyond blocks

    def points(self) -> list[Point]:
        """``embed.resid_post`` then ``blocks.{i}.resid_post``, in model order."""
        if self.extra_points:
            return list(self.extra_points)
        out = [self.embed_point] if self.embed_point is not None else []
        return out + [Point(f"blocks.{i}.resid_post", b) for i, b in enumerate(self.blocks)]

    def describe(self) -> str:
        """One line: how many blocks, where, and how they were found."""
        att = f", attention in {len(self.attention)}" if self.attention else ""
        norm = f", final norm {self.final_norm}" if self.final_norm else ""
        return f"{len(self.blocks)} blocks at {self.blocks_name} ({self.source}){att}{norm}"


def discover(model: nn.Module) -> Structure:
    """The :class:`Structure` of ``model`` (module docstring); :class:`StructureError` with an
    example ``--points`` glob when it has no recognisable blocks."""
    inner = unwrap(model)
    rp = getattr(inner, "residual_points", None)
    if callable(rp):
        return _from_protocol(inner, rp())
    cfg = getattr(inner, "config", None)
    override = OVERRIDES.get(getattr(cfg, "model_type", None) or "")
    names = {id(m): n for n, m in inner.named_modules()}
    if override is not None:
        blocks_mod = inner.get_submodule(override["blocks"])
        return _finish(inner, list(blocks_mod), override["blocks"], "override", names)
    if is_hf(inner):
        found = _hf_blocks(inner, names)
        if found is not None:
            return _finish(inner, found[0], found[1], "discovered", names)
    name = block_list_name(inner)
    if name is None:
        lists = [n for n, m in inner.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
        first = next((n for n, _ in inner.named_modules() if n), "*")
        example = f"{lists[0]}.*" if lists else first
        raise StructureError(
            f"{type(inner).__name__} has no block list (nn.ModuleList of blocks) to find its "
            f"residual stream in; pass module-name globs as points (e.g. '{example}')"
        )
    return _finish(inner, _blocks(inner.get_submodule(name)), name, "guessed", names)


def _from_protocol(model: nn.Module, rp: dict[str, nn.Module]) -> Structure:
    points = [Point(n, m) for n, m in rp.items()]
    blocks = [m for n, m in rp.items() if re.fullmatch(r"blocks\.\d+\.resid_post", n)]
    names = {id(m): n for n, m in model.named_modules()}
    first = names.get(id(blocks[0]), "") if blocks else ""
    attention: dict[str, tuple[nn.Module, int]] = {}
    ap = getattr(model, "attention_points", None)
    if callable(ap):
        attention = {n: (m, -1) for n, m in ap().items() if hasattr(m, "probs_sink")}
    return Structure(blocks, first.rpartition(".")[0] or first, "residual_points()",
                     attention=attention, extra_points=points)  # fmt: skip


def text_config(cfg: Any) -> Any:
    """An HF config's text config (a multimodal model's language model), else ``cfg``."""
    getter = getattr(cfg, "get_text_config", None)
    try:
        return getter() if callable(getter) else cfg
    except (TypeError, ValueError, AttributeError):
        return cfg


def _recorded(model: nn.Module, key: str) -> tuple[type | None, int, str | None]:
    """The class transformers records ``key`` (``hidden_states``/``attentions``) from, the
    output index, and the recorder's layer-name filter; Nones when the family declares none."""
    for cls in type(model).__mro__:
        rec = (getattr(cls, "_can_record_outputs", None) or {}).get(key)
        if rec is None:
            continue
        if isinstance(rec, type):
            return rec, 1 if key == "attentions" else 0, None
        target = getattr(rec, "target_class", None)
        if isinstance(target, type):
            return target, int(getattr(rec, "index", 0) or 0), getattr(rec, "layer_name", None)
    # the family's base model may declare it while the causal-LM head class does not
    base = getattr(model, "base_model", None)
    if isinstance(base, nn.Module) and base is not model:
        return _recorded(base, key)
    return None, 0, None


def _hf_blocks(model: nn.Module, names: dict[int, str]) -> tuple[list[nn.Module], str] | None:
    """The decoder's block list of an HF model: the ModuleList of num_hidden_layers blocks."""
    cfg = text_config(getattr(model, "config", None))
    try:
        n = getattr(cfg, "num_hidden_layers", None)
    except Exception:  # some configs raise on a per-layer attribute
        n = None
    roots: list[nn.Module] = []
    getter = getattr(model, "get_decoder", None)
    try:
        dec = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        dec = None
    for root in (dec, getattr(model, "base_model", None), model):
        if isinstance(root, nn.Module) and root not in roots:
            roots.append(root)
    block_cls, _, _ = _recorded(model, "hidden_states")
    for root in roots:
        lists = [m for m in root.modules() if _is_block_list(m)]
        sized = [m for m in lists if n is None or len(m) == n]
        if block_cls is not None:
            typed = [m for m in sized or lists if isinstance(m[0], block_cls)]
            if typed:
                return list(typed[0]), names.get(id(typed[0]), "")
        if sized:
            return list(sized[0]), names.get(id(sized[0]), "")
    return None


def _finish(model: nn.Module, blocks: list[nn.Module], blocks_name: str, source: str,
            names: dict[int, str]) -> Structure:  # fmt: skip
    if not blocks:
        raise StructureError(f"{type(model).__name__}: the block list {blocks_name} is empty")
    embedding = None
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embedding = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError, TypeError):
        embedding = None
    return Structure(
        blocks=blocks,
        blocks_name=blocks_name,
        source=source,
        embed_point=Point("embed.resid_post", blocks[0], "input"),
        embedding=embedding if isinstance(embedding, nn.Module) else None,
        final_norm=_final_norm(model, blocks_name, names),
        attention=_attention(model, blocks),
    )


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.RMSNorm)) or type(m).__name__.endswith("Norm")


def _final_norm(model: nn.Module, blocks_name: str, names: dict[int, str]) -> str | None:
    """The norm that follows the blocks: the last norm registered beside the block list."""
    parent_name = blocks_name.rpartition(".")[0]
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        return None
    norms = [m for n, m in parent.named_children() if _is_norm(m) and "emb" not in n.lower()]
    return names.get(id(norms[-1])) if norms else None


_ATTN_NAME = re.compile(r"(Self)?Attention\d*$|Attn$")


def _attention(model: nn.Module, blocks: list[nn.Module]) -> dict[str, tuple[nn.Module, int]]:
    """``blocks.{i}.attn`` → (attention module, index of its probabilities in the output)."""
    cls, index, layer_name = _recorded(model, "attentions")
    out: dict[str, tuple[nn.Module, int]] = {}
    for i, block in enumerate(blocks):
        for sub_name, sub in block.named_modules():
            if not sub_name:
                continue
            if layer_name and not ("." + sub_name).endswith(layer_name):
                continue
            hit = isinstance(sub, cls) if cls is not None else bool(
                _ATTN_NAME.search(type(sub).__name__))  # fmt: skip
            if hit:
                out[f"blocks.{i}.attn"] = (sub, index if cls is not None else 1)
                break
    return out


def _is_block_list(m: nn.Module) -> bool:
    """A non-empty ``nn.ModuleList`` whose first element has submodules (not a list of
    linears or norms)."""
    return isinstance(m, nn.ModuleList) and len(m) > 0 and any(True for _ in m[0].children())


def _is_block_dict(m: nn.Module) -> bool:
    """A non-empty ``nn.ModuleDict`` keyed ``"0"``, ``"1"``, … in order whose first element has
    submodules (torchtitan keeps its blocks so, so that pipeline stages can drop some)."""
    return (isinstance(m, nn.ModuleDict) and len(m) > 0
            and list(m.keys()) == [str(i) for i in range(len(m))]
            and any(True for _ in m["0"].children()))


def _blocks(m: nn.Module) -> list[nn.Module]:
    """The blocks of a block list or numbered block dict, in order."""
    return list(m.values()) if isinstance(m, nn.ModuleDict) else list(m)


def block_list_name(model: nn.Module) -> str | None:
    """The name of the longest ``nn.ModuleList`` (or numbered ``nn.ModuleDict``) of modules with
    children (most likely the blocks), None when there is none."""
    lists = [(len(m), n) for n, m in model.named_modules()
             if n and (_is_block_list(m) or _is_block_dict(m))]
    return max(lists, key=lambda t: (t[0], -len(t[1])))[1] if lists else None


def check(model: nn.Module, points: Any = "auto") -> str:
    """Right after loading: the structure (or the ``points`` globs) must be found; returns the
    one line saying what will be measured. Raises :class:`ConfigError` in seconds otherwise."""
    if isinstance(points, str) and points == "auto":
        return "structure: " + discover(model).describe()  # one discovery, not two
    chosen = resolve_points(model, points)
    return f"points: {len(chosen)} modules match {' '.join(points)}"


# --- choosing points ------------------------------------------------------------------------


def auto_points(model: nn.Module) -> list[Point] | None:
    """Residual-stream points of ``model`` (:func:`outlierlab.structure.discover`); None when
    its structure cannot be found."""
    try:
        return discover(model).points()
    except StructureError:
        return None


def resolve_points(model: nn.Module, points: str | Sequence[str] = "auto") -> list[Point]:
    """``"auto"`` (the discovered residual stream) or glob patterns → ordered measurement
    points: matching point names first, then matching module names (:func:`glob_regex`)."""
    if isinstance(points, str) and points == "auto":
        return discover(model).points()
    globs = [points] if isinstance(points, str) else list(points)
    if not globs or not all(isinstance(g, str) and g for g in globs):
        raise ConfigError(f"points must be 'auto' or a list of glob patterns, got {points!r}")
    auto = auto_points(model)
    pats = [glob_regex(g) for g in globs]

    def hit(name: str) -> bool:
        return any(p.fullmatch(name) for p in pats)

    chosen = [p for p in auto or [] if hit(p.name)]
    chosen += [Point(n, m) for n, m in model.named_modules() if n and hit(n)]
    if not chosen:
        names = [p.name for p in auto or []][:2] + [n for n, _ in model.named_modules() if n][:3]
        raise ConfigError(
            f"points {' '.join(globs)} match nothing in {type(unwrap(model)).__name__}; "
            f"names look like {', '.join(names)}"
        )
    return chosen


def glob_regex(glob: str) -> re.Pattern:
    """A module-name glob as a regex: ``*`` matches within one dotted component, ``**`` across
    components, ``?`` one character other than a dot, ``[...]`` a character class."""
    out, i = [], 0
    while i < len(glob):
        c = glob[i]
        if glob.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append("[^.]*")
        elif c == "?":
            out.append("[^.]")
        elif c == "[" and "]" in glob[i + 1 :]:
            j = glob.index("]", i + 1)
            body = glob[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = j
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out))


# --- hooks ------------------------------------------------------------------------------------


def first_tensor(out: Any) -> torch.Tensor | None:
    """The hidden states in a module output: a tensor, element 0 of a tuple/list, the first
    tensor of a mapping (HF ``ModelOutput``) or of a dataclass."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return first_tensor(out[0]) if out else None
    if isinstance(out, dict):
        return next((v for v in out.values() if isinstance(v, torch.Tensor)), None)
    fields = getattr(out, "__dataclass_fields__", None)
    if fields:
        return next(
            (v for f in fields if isinstance(v := getattr(out, f, None), torch.Tensor)), None
        )
    return None


def _eager(hook: Callable) -> Callable:
    """``hook`` run eagerly even where its module is compiled: ``module.compile(fullgraph=True)``
    (torchtitan's per-block compile) compiles ``_call_impl`` with the module's hooks, and dynamo
    cannot trace a hook's numpy and host-side work."""
    return torch.compiler.disable(hook)


def hook_points(points: list[Point], record: Callable[[str, torch.Tensor], None]) -> list[Any]:
    """Forward hooks calling ``record(name, hidden states)`` at every point; returns handles."""
    handles = []
    try:
        for p in points:
            if p.kind == "input":

                def pre(module: nn.Module, args: tuple, kwargs: dict, name: str = p.name) -> None:
                    x = first_tensor(args[0] if args else kwargs.get("hidden_states"))
                    if x is not None:
                        record(name, x)

                handles.append(p.module.register_forward_pre_hook(_eager(pre), with_kwargs=True))
            else:

                def post(module: nn.Module, args: tuple, out: Any, name: str = p.name) -> None:
                    x = first_tensor(out)
                    if x is not None:
                        record(name, x)

                handles.append(p.module.register_forward_hook(_eager(post)))
    except BaseException:
        for h in handles:
            h.remove()
        raise
    return handles


class AttentionPoint:
    """The attention probabilities of one layer, delivered to a ``sink`` while one is set:
    ``sink.rows(batch, seq_len, device)`` picks the sequences (None: all) and ``sink(probs)``
    receives their (b, heads, T, S) probabilities. outlierlab's GPT computes them itself
    (``probs_sink``); an HF attention module returns them as output element ``index`` under
    eager attention, read by a forward hook."""

    def __init__(self, name: str, module: nn.Module, index: int) -> None:
        self.name, self.module, self.index = name, module, index
        self.sink: Any = None
        self._handle: Any = None

    def open(self) -> None:
        if self.index < 0 or self._handle is not None:
            return
        self._handle = self.module.register_forward_hook(_eager(self._hook))

    def set_sink(self, sink: Any) -> None:
        self.sink = sink
        if self.index < 0:
            self.module.probs_sink = sink

    def close(self) -> None:
        self.set_sink(None)
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        sink = self.sink
        if sink is None or not isinstance(out, (tuple, list)) or len(out) <= self.index:
            return
        probs = out[self.index]
        if not isinstance(probs, torch.Tensor) or probs.dim() != 4:
            return
        with torch.no_grad():
            probs = probs.detach()
            rows = sink.rows(probs.shape[0], probs.shape[-2], probs.device)
            sink(probs if rows is None else probs[rows])


@contextmanager
def attention_points(model: nn.Module, structure: Structure | None = None
                     ) -> Iterator[dict[str, AttentionPoint]]:  # fmt: skip
    """Open the attention points of ``model`` (an HF model switched to eager attention
    meanwhile, then switched back); yields ``{}`` when the model exposes none."""
    structure = structure or discover(model)
    inner = unwrap(model)
    restore = None
    undo_flag = None
    if structure.attention and is_hf(inner):
        owner = _owner(inner, structure.blocks[0])
        restore = eager_attention(owner)
        cfg = getattr(owner, "config", None)
        if _recorded(inner, "attentions")[0] is None and cfg is not None:
            # older code paths (OpenAI GPT, MVP, TrOCR, CPM-Ant) return the probabilities
            # from their attention modules only when output_attentions is on
            undo_flag = (cfg, cfg.output_attentions)
            cfg.output_attentions = True
    if restore is False:  # the model cannot run eager attention: no probabilities
        yield {}
        return
    points = {n: AttentionPoint(n, m, i) for n, (m, i) in structure.attention.items()}
    try:
        for p in points.values():
            p.open()
        yield points
    finally:
        for p in points.values():
            p.close()
        if callable(restore):
            restore()
        if undo_flag is not None:
            undo_flag[0].output_attentions = undo_flag[1]


def _owner(model: nn.Module, block: nn.Module) -> nn.Module:
    """The innermost HF model holding ``block`` (a multimodal model's text model): only its
    attention is switched, so towers that support one kind only (Gemma 4's audio) keep theirs."""
    owners = [(n.count(".") + bool(n), m) for n, m in model.named_modules()
              if callable(getattr(m, "set_attn_implementation", None))
              and hasattr(m, "config") and any(b is block for b in m.modules())]  # fmt: skip
    return max(owners, key=lambda t: t[0])[1] if owners else model


def eager_attention(model: nn.Module) -> Callable[[], None] | bool | None:
    """Switch an HF model to eager attention (the kind that returns probabilities): the
    function that switches it back, None when it already is, False when it cannot. Families
    that cannot switch through ``set_attn_implementation`` but read the config at call time
    (Falcon, MPT, ...) get the config value set directly."""
    cfg = getattr(model, "config", None)
    old = getattr(cfg, "_attn_implementation", None)
    setter = getattr(model, "set_attn_implementation", None)
    if old in (None, "eager"):
        return None
    switched = False
    if callable(setter):
        with _transformers_quiet():
            try:
                setter("eager")
                switched = cfg._attn_implementation == "eager"
            except (ValueError, ImportError, NotImplementedError, AttributeError):
                switched = False
    if switched:
        return lambda: _restore(setter, cfg, old)
    try:
        cfg._attn_implementation = "eager"
    except (AttributeError, ValueError):
        return False
    return lambda: setattr(cfg, "_attn_implementation", old)


def _restore(setter: Callable[[str], None], cfg: Any, old: str) -> None:
    with _transformers_quiet():
        try:
            setter(old)
        except (ValueError, ImportError, NotImplementedError, AttributeError):
            cfg._attn_implementation = old


@contextmanager
def _transformers_quiet() -> Iterator[None]:
    """transformers' warnings off meanwhile (the CLI's stderr is for one-line errors)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def forward_tokens(model: nn.Module, idx: torch.Tensor) -> Any:
    """One forward pass on (B, T) token ids: ``model(input_ids=idx, use_cache=False)`` for an HF
    model (no KV cache to build: nothing is generated), ``model(idx)`` otherwise."""
    if not is_hf(model):
        return model(idx)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    takes = "use_cache" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())
    return model(input_ids=idx, use_cache=False) if takes else model(input_ids=idx)
