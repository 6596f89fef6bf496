"""Datasets from files and `datasets.Dataset`s: rows -> (samples, rewards).

Column conventions (every name can be changed with ``columns={"text": "review", ...}``). Each
row holds one sample, in the first of these layouts whose columns it has:

- ``messages``: a chat, a list of ``{"role": ..., "content": ...}``; assistant messages are
  outputs (actions), the other messages before each of them are joined by newlines into its
  prompt; the chat must end with an assistant message;
- ``dialogue``: a list of strings alternating prompt and output;
- ``prompt`` + ``completion``;
- ``text``: a plain string, all of it output;
- ``prompt`` + ``chosen`` + ``rejected``: a preference pair, two samples (chosen=+1,
  rejected=-1; see `ilql.preferences` for other values).

and its reward in ``reward`` (a number, or a list with one number per output segment) or in
``token_rewards`` (a list with one number per output token). Files: JSONL (``.jsonl``,
``.ndjson``), CSV (``.csv``: list cells are JSON text such as ``[1, 0.5]``) and Parquet
(``.parquet``). A bad row raises `DataError`/`DataTypeError` naming the file, the row (JSONL:
the line) and the column, before any tokenization.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from .data import TokenRewards
from .errors import DataError, DataTypeError

FLOAT32_MAX = 3.4028234663852886e38
FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Columns:
    """The column names a dataset uses; pass a dict with the ones that differ."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    dialogue: str = "dialogue"
    chosen: str = "chosen"
    rejected: str = "rejected"
    reward: str = "reward"
    token_rewards: str = "token_rewards"
    role: str = "role"
    content: str = "content"
    assistant_role: str = "assistant"

    @classmethod
    def of(cls, columns: Union[None, Dict[str, str], "Columns"]) -> "Columns":
        if columns is None:
            return cls()
        if isinstance(columns, Columns):
            return columns
        if not isinstance(columns, dict):
            raise DataTypeError(f"columns must be a dict like {{'text': 'review'}}, got {type(columns).__name__}")
        allowed = [f.name for f in fields(cls)]
        for key, value in columns.items():
            if key not in allowed:
                raise DataError(f"columns: unknown key {key!r}; allowed: {', '.join(allowed)}")
            if not isinstance(value, str) or not value:
                raise DataTypeError(f"columns[{key!r}] must be a column name (a string), got {value!r}")
        return cls(**columns)


class RowError(Exception):
    """A problem in one column of a row, before the row's location is known."""

    def __init__(self, column: Optional[str], message: str, type_error: bool = False, missing: bool = False):
        super().__init__(message)
        self.column, self.message, self.type_error, self.missing = column, message, type_error, missing

    def located(self, where: str) -> Exception:
        """The library error, naming the row (`where`) and the column."""
        if self.missing:
            message = f"{where}: column {self.column!r} is missing ({self.message})"
        elif self.column:
            message = f"{where}, column {self.column!r}: {self.message}"
        else:
            message = f"{where}: {self.message}"
        return (DataTypeError if self.type_error else DataError)(message)


# ------------------------------------------------------------------------------ one row
def _present(row: Dict[str, Any], name: str) -> bool:
    return row.get(name) is not None  # null cells (None) count as absent; NaN is a bad value


def _string(row, name: str, output: bool) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}", type_error=True)
    if output and not value:
        raise RowError(name, "the output is empty; every output needs text")
    return value


def _parse_cell(value: Any) -> Any:
    """CSV cells are text: lists come as JSON."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(None, f"not valid JSON ({e.msg})") from None
    return value


def _number(value: Any, column: str, what: str = "a number") -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise RowError(column, f"expected {what}, got {value!r}", type_error=True) from None
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise RowError(column, f"expected {what}, got {type(value).__name__} ({value!r})", type_error=True)
    try:
        value = float(value)
    except OverflowError:  # an integer beyond the float range
        raise RowError(column, f"expected a finite number, got an integer of {int(value).bit_length()} bits") from None
    if not math.isfinite(value):
        raise RowError(column, f"expected a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:  # rewards train in float32
        raise RowError(column, f"{value!r} is outside the float32 range; rescale the rewards")
    return value


def _number_list(value: Any, column: str) -> List[float]:
    value = _cell(value, column)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise RowError(column, f"expected a list of numbers, got {type(value).__name__}", type_error=True)
    return [_number(v, column, f"a number at position {k}") for k, v in enumerate(value)]


def _cell(value: Any, column: str) -> Any:
    try:
        return _parse_cell(value)
    except RowError as e:
        raise RowError(column, e.message) from None


def _messages(value: Any, c: Columns) -> List[str]:
    value = _cell(value, c.messages)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(c.messages, "expected a non-empty list of messages", type_error=True)
    dialogue, pending = [], []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get(c.role), str) or not isinstance(m.get(c.content), str):
            raise RowError(
                c.messages, f"message {k}: expected {{{c.role!r}: str, {c.content!r}: str}}, got {m!r}", type_error=True
            )
        if m[c.role] == c.assistant_role:
            if not m[c.content]:
                raise RowError(c.messages, f"message {k}: the assistant message is empty")
            dialogue += ["\n".join(pending), m[c.content]]
            pending = []
        else:
            pending.append(m[c.content])
    if pending or not dialogue:
        raise RowError(c.messages, f"the chat must end with a {c.assistant_role!r} message (its last output)")
    return dialogue


def _dialogue(value: Any, c: Columns) -> List[str]:
    value = _cell(value, c.dialogue)
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value or len(value) % 2:
        raise RowError(c.dialogue, "expected a list of strings alternating prompt and output (an even number)")
    for k, text in enumerate(value):
        if not isinstance(text, str):
            raise RowError(c.dialogue, f"segment {k}: expected a string, got {type(text).__name__}", type_error=True)
        if k % 2 and not text:
            raise RowError(c.dialogue, f"segment {k}: the output is empty")
    return list(value)


def row_to_samples(
    row: Dict[str, Any], c: Columns, chosen_reward: float = 1.0, rejected_reward: float = -1.0
) -> List[Tuple[Any, Any]]:
    """The (sample, reward) pairs of one row (two for a preference pair)."""
    if _present(row, c.chosen) or _present(row, c.rejected):
        prompt = _string(row, c.prompt, output=False) if _present(row, c.prompt) else None
        pair = []
        for name, reward in ((c.chosen, chosen_reward), (c.rejected, rejected_reward)):
            if name not in row or row[name] is None:
                raise RowError(name, "a preference row needs chosen and rejected", missing=True)
            text = _string(row, name, output=True)
            pair.append(([prompt, text] if prompt is not None else text, reward))
        return pair

    if _present(row, c.messages):
        sample = _messages(row[c.messages], c)
    elif _present(row, c.dialogue):
        sample = _dialogue(row[c.dialogue], c)
    elif _present(row, c.prompt) or _present(row, c.completion):
        for name in (c.prompt, c.completion):
            if name not in row or row[name] is None:
                raise RowError(name, "prompt and completion go together", missing=True)
        sample = [_string(row, c.prompt, output=False), _string(row, c.completion, output=True)]
    elif _present(row, c.text):
        sample = _string(row, c.text, output=True)
    else:
        raise RowError(
            None,
            f"expected column {c.text!r}, {c.prompt!r}+{c.completion!r}, {c.messages!r}, {c.dialogue!r} or "
            f"{c.prompt!r}+{c.chosen!r}+{c.rejected!r}; the row has values in {sorted(k for k in row if _present(row, k))}",
        )
    n_outputs = 1 if isinstance(sample, str) else len(sample) // 2

    if _present(row, c.token_rewards):
        reward: Any = TokenRewards(_number_list(row[c.token_rewards], c.token_rewards))
    elif _present(row, c.reward):
        value = _cell(row[c.reward], c.reward)
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, (list, tuple)):
            reward = _number_list(value, c.reward)
            if len(reward) != n_outputs:
                raise RowError(
                    c.reward, f"got {len(reward)} per-turn rewards for {n_outputs} output segment(s); give one each"
                )
        else:
            reward = _number(value, c.reward)
    else:
        raise RowError(c.reward, f"give a reward, or {c.token_rewards!r} for per-token rewards", missing=True)
    return [(sample, reward)]


# ------------------------------------------------------------------------------ many rows
def records_to_dataset(
    records: Iterable[Tuple[str, Dict[str, Any]]], columns=None, **preference_rewards: float
) -> Tuple[List[Any], List[Any]]:
    """(samples, rewards) from (location, row) pairs; an error names the location and column.
    `preference_rewards`: chosen_reward / rejected_reward for preference rows."""
    c = Columns.of(columns)
    samples, rewards = [], []
    for where, row in records:
        if not isinstance(row, dict):
            raise DataTypeError(f"{where}: expected a record (a mapping of columns), got {type(row).__name__}")
        try:
            pairs = row_to_samples(row, c, **preference_rewards)
        except RowError as e:
            raise e.located(where) from None
        for sample, reward in pairs:
            samples.append(sample)
            rewards.append(reward)
    if not samples:
        raise DataError("the dataset is empty: give at least one row")
    return samples, rewards


def _jsonl_records(path: Path) -> Iterator[Tuple[str, Dict[str, Any]]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {line_no}: expected a JSON object, got {type(row).__name__}")
            yield f"{path}, line {line_no}", row


def _csv_records(path: Path) -> Iterator[Tuple[str, Dict[str, Any]]]:
    import csv

    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row_no, row in enumerate(reader, start=1):
            if None in row:
                raise DataError(f"{path}, row {row_no}: more cells than the header has columns")
            yield f"{path}, row {row_no}", {k: (None if v == "" else v) for k, v in row.items()}


def _parquet_records(path: Path) -> Iterator[Tuple[str, Dict[str, Any]]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency of the data extra
        raise DataError("reading Parquet needs pyarrow: pip install 'ilql[data]'") from None
    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=65536):
        for row in batch.to_pylist():
            row_no += 1
            yield f"{path}, row {row_no}", row


def load_file(path: Union[str, os.PathLike], columns=None, **preference_rewards: float) -> Tuple[List[Any], List[Any]]:
    """(samples, rewards) from a JSONL, CSV or Parquet file (see the module docstring)."""
    path = Path(path)
    kind = FILE_FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown data file type {path.suffix!r}; expected one of {', '.join(FILE_FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    reader = {"jsonl": _jsonl_records, "csv": _csv_records, "parquet": _parquet_records}[kind]
    return records_to_dataset(reader(path), columns, **preference_rewards)


def _is_hf_dataset(obj: Any) -> bool:
    return hasattr(obj, "column_names") and hasattr(obj, "features") and hasattr(obj, "__getitem__")


def load_hf_dataset(dataset, columns=None, name: str = "dataset", **preference_rewards: float) -> Tuple[List[Any], List[Any]]:
    """(samples, rewards) from a `datasets.Dataset` (rows numbered from 0, as it indexes them)."""
    if isinstance(dataset, dict) or not hasattr(dataset, "iter"):
        raise DataTypeError(f"{name}: expected a datasets.Dataset (a DatasetDict needs a split, e.g. ds['train'])")

    def records():
        row_no = 0
        for batch in dataset.iter(batch_size=4096):
            keys = list(batch)
            for values in zip(*(batch[k] for k in keys)):
                yield f"{name} row {row_no}", dict(zip(keys, values))
                row_no += 1

    return records_to_dataset(records(), columns, **preference_rewards)


def resolve_dataset(dataset: Any, columns=None) -> Tuple[Sequence[Any], Sequence[Any]]:
    """Whatever `train(dataset=...)` accepts, as (samples, rewards): a (samples, rewards) pair,
    a path to a JSONL/CSV/Parquet file, a `datasets.Dataset`, or a list of records (dicts
    following the column conventions, e.g. preference triples)."""
    if isinstance(dataset, (str, os.PathLike)):
        return load_file(dataset, columns)
    if _is_hf_dataset(dataset):
        return load_hf_dataset(dataset, columns)
    if isinstance(dataset, (list, tuple)) and dataset and all(isinstance(r, dict) for r in dataset):
        return records_to_dataset(((f"record {i}", r) for i, r in enumerate(dataset)), columns)
    if isinstance(dataset, (tuple, list)) and len(dataset) == 2:
        return dataset[0], dataset[1]
    if isinstance(dataset, dict) and dataset and all(_is_hf_dataset(v) for v in dataset.values()):
        raise DataTypeError(f"dataset is a DatasetDict with splits {sorted(dataset)}: pick one, e.g. dataset['train']")
    raise DataTypeError(
        "dataset must be a (samples, rewards) pair, a path to a .jsonl/.csv/.parquet file, a datasets.Dataset "
        f"or a list of records (dicts), got {type(dataset).__name__}"
    )
