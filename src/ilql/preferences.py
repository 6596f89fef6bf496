"""Preference pairs -> ILQL samples and rewards.

ILQL learns from rewarded samples, so a preference record ``(prompt, chosen, rejected)``
becomes two samples on the same prompt: ``[prompt, chosen]`` with reward `chosen_reward`
(+1 by default) and ``[prompt, rejected]`` with `rejected_reward` (-1 by default).

    samples, rewards = ilql.preferences(records)            # or
    ilql.train(..., dataset=ilql.preferences(records, chosen_reward=1.0, rejected_reward=0.0))
    ilql.train(..., dataset=records)                        # the defaults, directly

Records may be dicts with ``prompt``/``chosen``/``rejected`` (names configurable with
`columns`; the prompt may be left out), 3-tuples, a `datasets.Dataset`, or a file path.
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any, List, Tuple

from .errors import DataError, DataTypeError

CHOSEN_REWARD = 1.0
REJECTED_REWARD = -1.0


def _reward(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise DataTypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def preferences(
    records: Any,
    chosen_reward: float = CHOSEN_REWARD,
    rejected_reward: float = REJECTED_REWARD,
    columns=None,
) -> Tuple[List[Any], List[Any]]:
    """(samples, rewards) from preference records; see the module docstring."""
    from .sources import Columns, _is_hf_dataset, load_file, load_hf_dataset, records_to_dataset

    values = dict(
        chosen_reward=_reward(chosen_reward, "chosen_reward"),
        rejected_reward=_reward(rejected_reward, "rejected_reward"),
    )
    c = Columns.of(columns)
    if isinstance(records, (str, os.PathLike)):
        return load_file(records, c, **values)
    if _is_hf_dataset(records):
        return load_hf_dataset(records, c, name="preferences", **values)
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
        raise DataTypeError(f"preferences: expected a list of records, got {type(records).__name__}")
    rows = []
    for i, r in enumerate(records):
        if isinstance(r, (tuple, list)):
            if len(r) != 3:
                raise DataError(f"preference record {i}: expected (prompt, chosen, rejected), got {len(r)} items")
            r = {c.prompt: r[0], c.chosen: r[1], c.rejected: r[2]}
        if not isinstance(r, dict) or c.chosen not in r or c.rejected not in r:
            got = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise DataError(
                f"preference record {i}: expected columns {c.chosen!r} and {c.rejected!r} "
                f"(and optionally {c.prompt!r}), got {got}"
            )
        rows.append((f"preference record {i}", r))
    if not rows:
        raise DataError("preferences: no records given")
    return records_to_dataset(rows, c, **values)
