"""On-disk cache of tokenized episodes.

A dataset is tokenized once; its `EpisodeStore` arrays are written as ``.npy`` files in a
directory named by a key that hashes the data (texts and rewards), the tokenizer (its full
serialized definition and special tokens) and the settings (seq_length, truncation side,
standardization). Any change gives another key, so a stale cache is never read. The arrays
are opened memory-mapped: a cached dataset costs page cache, not process memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .data import EpisodeStore, TokenRewards, as_dialogue

CACHE_VERSION = 1  # bump when the episode layout changes
_FIELDS = ("tokens", "token_offsets", "actions", "action_offsets", "rewards")


def _tokenizer_identity(tokenizer) -> bytes:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = backend.to_str()
    else:  # slow tokenizers: the vocabulary stands for the definition
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    special = dict(
        cls=type(tokenizer).__name__,
        bos=tokenizer.bos_token_id,
        eos=tokenizer.eos_token_id,
        truncation_side=tokenizer.truncation_side,
        added=sorted((str(k), v) for k, v in tokenizer.get_added_vocab().items()),
    )
    return definition.encode() + json.dumps(special, sort_keys=True).encode()


def dataset_key(samples: Sequence[Any], rewards: Any, tokenizer, **settings) -> str:
    """A hex digest of data (checked samples, rewards as `check_samples` returns them) +
    tokenizer + settings."""
    h = hashlib.sha256()
    h.update(json.dumps(dict(version=CACHE_VERSION, **settings), sort_keys=True).encode())
    h.update(hashlib.sha256(_tokenizer_identity(tokenizer)).digest())
    for sample in samples:
        dialogue = as_dialogue(sample)
        h.update(b"\x1e%d" % len(dialogue))
        for text in dialogue:
            h.update(b"\x1f\x00" if text is None else b"\x1f" + text.encode("utf-8", "surrogatepass"))
    if isinstance(rewards, np.ndarray):  # all scalars
        h.update(b"A" + np.ascontiguousarray(rewards, dtype=np.float64).tobytes())
        return h.hexdigest()[:32]
    for r in rewards:
        if isinstance(r, TokenRewards):
            h.update(b"T" + np.asarray(r.values, dtype=np.float64).tobytes())
        elif isinstance(r, np.ndarray):
            h.update(b"L" + np.asarray(r, dtype=np.float64).tobytes())
        else:
            h.update(b"S" + np.float64(r).tobytes())
    return h.hexdigest()[:32]


def _entry(cache_dir, key: str) -> Path:
    return Path(cache_dir) / f"episodes-{key}"


def load_store(cache_dir, key: str) -> Optional[EpisodeStore]:
    """The cached episodes for `key`, memory-mapped, or None when there are none (or they are
    incomplete)."""
    entry = _entry(cache_dir, key)
    if not (entry / "meta.json").is_file():
        return None
    try:
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in _FIELDS}
    except (OSError, ValueError):
        return None
    return EpisodeStore(**arrays)


def save_store(store: EpisodeStore, cache_dir, key: str) -> Path:
    """Write the store's arrays under `key`, in a temporary directory renamed into place, so a
    reader never sees a half-written entry."""
    entry = _entry(cache_dir, key)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
    try:
        for name, values in store.arrays().items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(values), allow_pickle=False)
        (tmp / "meta.json").write_text(json.dumps({"version": CACHE_VERSION, "episodes": len(store)}))
        try:
            os.replace(tmp, entry)
        except OSError:  # another process cached the same key first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry
