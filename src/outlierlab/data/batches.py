"""Batches from a token array: random training windows with a resumable generator, and the
fixed validation windows.

A window is ``seq_len + 1`` consecutive tokens ``w``; the model reads ``x = w[:-1]`` and
predicts ``y = w[1:]`` (nanoGPT style).
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from outlierlab.errors import DataError


def _check_len(tokens: np.ndarray, seq_len: int, what: str) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"seq_len {seq_len} needs at least {seq_len + 1} tokens but the {what} split has "
            f"{len(tokens)}; lower seq_len or use a larger corpus"
        )


def _rng(seed: int, rank: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, rank])))


class BatchSampler:
    """Random windows of ``tokens`` as int64 tensors ``x, y`` of shape (B, T).

    Each sampler owns a PCG64 generator seeded from ``(seed, rank)``, so ranks draw different
    windows and a run is reproducible. :meth:`state_dict` (JSON-able) and
    :meth:`load_state_dict` make a resumed run see exactly the batches an uninterrupted one
    would. A state saved by another rank (e.g. rank 0's, in a shared checkpoint) is replayed
    for this rank from ``(seed, rank, batches drawn)``. ``world_size`` only bounds ``rank``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        what: str = "train",
    ) -> None:
        _check_len(tokens, seq_len, what)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise DataError(f"seed must be a non-negative integer, got {seed!r}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..world_size-1 ({world_size - 1}), got {rank}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.batches = 0
        self._offsets = np.arange(seq_len + 1)
        self._rng = _rng(seed, rank)

    @property
    def n_starts(self) -> int:
        """Number of possible window starts: ``len(tokens) - seq_len``."""
        return len(self.tokens) - self.seq_len

    def _starts(self, rng: np.random.Generator, batch_size: int, n_starts: int) -> np.ndarray:
        return rng.integers(0, n_starts, size=batch_size)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch ``(x, y)``, int64, (batch_size, seq_len)."""
        starts = self._starts(self._rng, self.batch_size, self.n_starts)
        w = np.asarray(self.tokens[starts[:, None] + self._offsets], dtype=np.int64)  # (B, T+1)
        self.batches += 1
        return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next()

    def state_dict(self) -> dict:
        """JSON-able state (the 128-bit PCG64 words are stored as decimal strings)."""
        st = self._rng.bit_generator.state
        return {
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_starts": self.n_starts,
            "batches": self.batches,
            "bit_generator": {
                "bit_generator": st["bit_generator"],
                "state": {k: str(v) for k, v in st["state"].items()},
                "has_uint32": int(st["has_uint32"]),
                "uinteger": int(st["uinteger"]),
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the sampler that saved ``state`` stopped (see class doc)."""
        try:
            seed, rank, batches = int(state["seed"]), int(state["rank"]), int(state["batches"])
            bg = state["bit_generator"]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"batch sampler state is malformed (missing or bad {exc})") from None
        if seed != self.seed:
            raise DataError(
                f"batch sampler state has seed {seed} but this sampler has seed {self.seed}"
            )
        if rank == self.rank:
            st = {
                "bit_generator": bg["bit_generator"],
                "state": {k: int(v) for k, v in bg["state"].items()},
                "has_uint32": int(bg["has_uint32"]),
                "uinteger": int(bg["uinteger"]),
            }
            rng = _rng(self.seed, self.rank)
            rng.bit_generator.state = st
        else:  # replay this rank's draws with the saved shape
            rng = _rng(self.seed, self.rank)
            for _ in range(batches):
                self._starts(rng, int(state["batch_size"]), int(state["n_starts"]))
        self._rng = rng
        self.batches = batches


def validation_windows(
    tokens: np.ndarray, seq_len: int, n_windows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n_windows`` windows of ``tokens`` with stride ``seq_len`` (so every token
    after the first is predicted once): ``x[i] = tokens[i*T : (i+1)*T]``, ``y[i]`` shifted by
    one. int64 tensors (n, T). ``None`` takes every full window; asking for more windows than
    the split holds warns and returns all of them; fewer than ``seq_len + 1`` tokens raises
    :class:`DataError`."""
    _check_len(tokens, seq_len, "validation")
    available = (len(tokens) - 1) // seq_len
    if n_windows is None:
        n = available
    else:
        if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
            raise DataError(f"n_windows must be a positive integer, got {n_windows!r}")
        n = n_windows
        if n > available:
            warnings.warn(
                f"validation split holds only {available} windows of seq_len {seq_len} "
                f"({len(tokens)} tokens); using {available}, not {n_windows}",
                stacklevel=2,
            )
            n = available
    flat = np.asarray(tokens[: n * seq_len + 1], dtype=np.int64)
    x = torch.from_numpy(flat[:-1].reshape(n, seq_len).copy())
    y = torch.from_numpy(flat[1:].reshape(n, seq_len).copy())
    return x, y


def document_starts(tokens: np.ndarray, eot_id: int) -> np.ndarray:
    """Where each document of a split begins: 0 and every position after an ``eot_id``
    (documents are written each followed by ``eot``), last one left out when nothing follows."""
    ends = np.flatnonzero(np.asarray(tokens) == eot_id) + 1
    starts = np.concatenate([[0], ends[ends < len(tokens)]]).astype(np.int64)
    return starts


def document_windows(
    tokens: np.ndarray, seq_len: int, n_windows: int, n_docs: int, eot_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_windows`` validation windows drawn across ``n_docs`` documents of the split (issue 23):
    the documents at evenly spaced positions of the split's document order (its documents are
    ordered by a stable hash of their names, :func:`outlierlab.data.split_documents`), then
    round-robin over them: window j of a document starts ``j · seq_len`` tokens into it while
    it fits inside the document (every chosen document gets its first window, which may run
    into the next one). Depends on the tokens only, so it is fixed per corpus. Fewer
    documents or fitting windows than asked for warn and use what there is. int64 tensors
    (n, T) like :func:`validation_windows`."""
    _check_len(tokens, seq_len, "validation")
    for name, v in (("n_windows", n_windows), ("n_docs", n_docs)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise DataError(f"{name} must be a positive integer, got {v!r}")
    last = len(tokens) - seq_len - 1  # the last start a window of seq_len + 1 tokens can have
    starts = document_starts(tokens, eot_id)
    ends = np.append(starts[1:], len(tokens))
    keep = starts <= last
    starts, ends = starts[keep], ends[keep]
    if len(starts) < n_docs:
        warnings.warn(f"validation split holds only {len(starts)} documents with a window of "
                      f"seq_len {seq_len}; using {len(starts)}, not {n_docs}", stacklevel=2)
    chosen = np.unique(np.round(np.linspace(0, len(starts) - 1, min(n_docs, len(starts))))
                       .astype(np.int64))  # fmt: skip
    per_doc = [np.arange(s, max(s, min(e - seq_len - 1, last)) + 1, seq_len)
               for s, e in zip(starts[chosen], ends[chosen])]  # fmt: skip
    picked: list[int] = []
    for j in range(max(len(p) for p in per_doc)):
        picked += [int(p[j]) for p in per_doc if j < len(p)]
        if len(picked) >= n_windows:
            break
    if len(picked) < n_windows:
        warnings.warn(f"{len(chosen)} validation documents hold only {len(picked)} windows of "
                      f"seq_len {seq_len}; using {len(picked)}, not {n_windows}", stacklevel=2)
    begin = np.sort(np.array(picked[:n_windows], dtype=np.int64))
    w = np.asarray(tokens[begin[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    return torch.from_numpy(w[:, :-1].copy()), torch.from_numpy(w[:, 1:].copy())
