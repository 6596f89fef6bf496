"""Atomic checkpoint directories, verified on load, and the training state that makes resume exact.

A checkpoint is written into a hidden temporary directory next to its final place; when every
file is on disk (and fsynced), ``manifest.json`` is written last, listing the step and every
file with its size and sha256, and the directory is renamed into place. A process killed at
any moment therefore leaves either a complete checkpoint or a hidden temporary directory that
resume skips (and reports); the previous checkpoint is never touched.

Nothing here unpickles: tensors live in safetensors files, everything else in JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import TrainingError

MANIFEST = "manifest.json"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "training_state.safetensors"
FORMAT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint_(\d+)$")
BEST_NAME = "best_checkpoint"
FAULT_ENV = "ILQL_FAULT_INJECT"


# ---------------------------------------------------------------------------- fault injection
def fault_point(name: str, step: int) -> None:
    """Test-only hook: ``ILQL_FAULT_INJECT=name:step`` makes the process SIGKILL itself here,
    so tests can crash a run at an exact, reproducible point (mid-run or mid-save)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------- files on disk
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_path(path: Path) -> None:
    # a rename is only durable once the data and the directory entry reached the disk
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() and hasattr(os, "O_DIRECTORY") else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, allow_nan=False), encoding="utf-8")
    _fsync_path(tmp)
    os.replace(tmp, path)


def build_manifest(directory: Path, step: int, kind: str) -> Dict[str, Any]:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel == MANIFEST:
            continue
        _fsync_path(path)
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {"format": FORMAT_VERSION, "kind": kind, "step": step, "files": files}


def write_checkpoint_dir(
    target: Path, write_files: Callable[[Path], None], step: int, kind: str = "train"
) -> Path:
    """Write a checkpoint to `target` atomically: `write_files(tmp)` fills a temporary directory,
    the manifest goes in last, then one rename publishes it. An existing `target` (the best
    checkpoint, or the same step saved twice) is moved aside first and removed after."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make published checkpoints private
        write_files(tmp)
        fault_point("mid_save", step)
        write_json_atomic(tmp / MANIFEST, build_manifest(tmp, step, kind))
        _fsync_path(tmp)
        fault_point("before_publish", step)
        old = target.with_name(f".{target.name}.old")
        if target.exists():
            _remove_tree(old)
            os.replace(target, old)
        fault_point("mid_replace", step)
        os.replace(tmp, target)
        _fsync_path(target.parent)
        _remove_tree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_tree(path: Path) -> None:
    """Rename first, then delete: a crash mid-delete leaves a hidden trash directory, never a
    checkpoint with some of its files gone."""
    if not path.exists():
        return
    trash = path.with_name(f".trash-{path.name.lstrip('.')}-{uuid.uuid4().hex[:12]}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def verify_checkpoint(directory: Path, checksums: bool = True) -> Optional[str]:
    """None if `directory` is a complete checkpoint, else why it is not."""
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        int(manifest["step"])
        if not isinstance(files, dict) or not all(isinstance(m, dict) for m in files.values()):
            raise TypeError("'files' must map names to {size, sha256}")
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest.json ({e})"
    for rel, meta in files.items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"the manifest names a file outside the checkpoint ({rel})"
        path = directory / rel
        if not path.is_file():
            return f"file {rel} is missing"
        if path.stat().st_size != meta.get("size"):
            return f"file {rel} has {path.stat().st_size} bytes, the manifest says {meta.get('size')}"
        if checksums and _sha256(path) != meta.get("sha256"):
            return f"file {rel} does not match its sha256 in the manifest"
    return None


def read_manifest(directory: Path) -> Dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST).read_text(encoding="utf-8"))


def list_checkpoints(root: Path) -> List[Tuple[int, Path]]:
    """Published training checkpoints ``checkpoint_<step>`` under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def partial_checkpoints(root: Path) -> List[Path]:
    """Temporary directories left by saves that were killed before they finished."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and ".tmp-" in p.name and p.name.startswith("."))


def find_latest_checkpoint(root: Path, report: Callable[[str], None] = None) -> Optional[Path]:
    """The newest complete training checkpoint under `root`, or None. Partial or corrupt ones
    are skipped and reported through `report` (default: a warning)."""
    report = report or (lambda msg: warnings.warn(msg, stacklevel=3))
    for path in partial_checkpoints(root):
        report(f"skipping the partial checkpoint {path} (its save was interrupted)")
    for _, path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        report(f"skipping the incomplete checkpoint {path}: {problem}")
    return None


def recover_replaced(root: Path) -> None:
    """A crash between the two renames that replace a checkpoint (the best one, or a step saved
    twice) leaves it only under its hidden ``.<name>.old`` name: put it back."""
    root = Path(root)
    if not root.is_dir():
        return
    for old in root.glob(".*.old"):
        target = root / old.name[1 : -len(".old")]
        if not target.exists() and old.is_dir() and verify_checkpoint(old, checksums=False) is None:
            os.replace(old, target)


def prune_checkpoints(root: Path, keep_last: Optional[int]) -> List[Path]:
    """Delete all but the newest `keep_last` complete training checkpoints and the leftovers of
    interrupted saves; the best checkpoint lives apart and is never pruned."""
    removed = []
    for path in partial_checkpoints(root):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    for trash in Path(root).glob(".trash-*"):
        shutil.rmtree(trash, ignore_errors=True)
    if keep_last is None:
        return removed
    complete = [p for _, p in list_checkpoints(root) if verify_checkpoint(p, checksums=False) is None]
    for path in complete[: max(0, len(complete) - keep_last)]:
        _remove_tree(path)
        removed.append(path)
    return removed


# ---------------------------------------------------------------------------- RNG state
def capture_rng_state() -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """Python, NumPy, torch CPU and CUDA generators as (JSON part, tensor part)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    json_part = {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }
    tensors = {"rng/torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda_{i}"] = state
    return json_part, tensors


def restore_rng_state(json_part: Dict[str, Any], tensors: Dict[str, torch.Tensor]) -> None:
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng/torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        # a machine with fewer GPUs than the saving one restores the devices it has
        for device, key in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(tensors[key], device)


# ---------------------------------------------------------------------------- optimizer state
def split_optimizer_state(state_dict: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """An optimizer's state_dict as (JSON part, tensors keyed ``optim/<param>/<name>``)."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index}/{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return {"param_groups": groups, "scalars": scalars}, tensors


def join_optimizer_state(json_part: Dict[str, Any], tensors: Dict[str, torch.Tensor], current: Dict[str, Any]):
    """Inverse of `split_optimizer_state`; tuples come back where the live optimizer has them."""
    state: Dict[int, Dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in json_part["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    if len(json_part["param_groups"]) != len(current["param_groups"]):
        raise TrainingError(
            f"the checkpoint's optimizer has {len(json_part['param_groups'])} parameter groups, "
            f"this run has {len(current['param_groups'])}"
        )
    groups = []
    for saved, live in zip(json_part["param_groups"], current["param_groups"]):
        groups.append({k: (tuple(v) if isinstance(live.get(k), tuple) else v) for k, v in saved.items()})
    return {"state": state, "param_groups": groups}


def save_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def load_tensors(path: Path) -> Dict[str, torch.Tensor]:
    return load_file(str(path))


def dataset_fingerprint(episodes) -> str:
    """A digest of the prepared episodes: resuming on other data cannot be exact."""
    digest = hashlib.sha256()
    if hasattr(episodes, "arrays"):  # an EpisodeStore: hash its flat arrays, no per-episode loop
        for name, array in sorted(episodes.arrays().items()):
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()
    for e in episodes:
        for array in (e.input_ids, e.actions_ixs, e.rewards):
            digest.update(np.ascontiguousarray(array).tobytes())
            digest.update(b"|")
    return digest.hexdigest()
