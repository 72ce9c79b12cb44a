"""Checking a model's privacy record when it is read back: a file cannot claim a cost it did not pay.

    epsilon = check_model_privacy(meta.get("privacy"), where="runs/dp/model/veil_model.json")

A release (``OUT/model/veil_model.json``), ``OUT/privacy.json``, an owner checkpoint and the cost
entries of an export all carry a privacy record: ``{"enabled", "private", "epsilon", "delta", ...}``
(``veil.lightning_modules.dp.accounting.PrivacyAccounting.record``). Whatever reads one back calls
``check_model_privacy`` before trusting or printing it. What it accepts, and what it means:

* ``"epsilon": null`` (or absent), ``"inf"``/``"Infinity"`` or a JSON ``Infinity``: no guarantee
  (epsilon infinite), as veil writes for a model trained without DP. A ``null`` under
  ``"private": true`` stays accepted and means no guarantee (an accountant can report an unbounded
  epsilon for a DP run); an explicit infinity under ``"private": true`` is contradictory (veil never
  writes one: its JSON is strict) and refused.
* a finite number >= 0: that epsilon.
* anything else, negative numbers, NaN, booleans, strings such as ``"-1"`` or ``"low"``: refused.
* ``delta``: null/absent, or a number in [0, 1); ``private``/``enabled``: true, false or absent.

The record a model carries of the models before it (``trained_with``: the DP record of a classifier
that unlearning updated; ``initialized_from.privacy``: a fine-tuned model's start) is checked too.
A refusal is a DataError naming the file and the field (exit status 2 on the command line). Plain
stdlib: every reader, torch-free ones included, shares it.
"""

from __future__ import annotations

import math
from typing import Any

from veil.errors import DataError

__all__ = ["check_model_privacy", "INFINITE_SPELLINGS"]

INFINITE_SPELLINGS = ("inf", "infinity", "+inf", "+infinity")  # how a string may say "no bound" (any case)
_NESTED = (("trained_with",), ("initialized_from", "privacy"))  # records of earlier models inside a record


def check_model_privacy(record: Any, *, where: str, field: str = "privacy") -> float:
    """The epsilon ``record`` claims (``math.inf``: no guarantee), after checking it can be believed.

    ``record``: a privacy record (a dict) or None (no record: no guarantee). ``where``: the file it was
    read from, ``field``: its key there; both are named by the DataError raised for a negative, NaN or
    malformed epsilon, a delta outside [0, 1), a non-boolean ``private``/``enabled``, or a
    ``"private": true`` record whose epsilon is an explicit infinity."""
    if record is None:
        return math.inf
    if not isinstance(record, dict):
        raise _refused(where, field, f"is {type(record).__name__} {record!r}, not a privacy record (a JSON object)")
    for key in ("private", "enabled"):
        if key in record and not isinstance(record[key], bool):
            raise _refused(where, f"{field}.{key}", f"is {record[key]!r}; must be true or false")
    epsilon, explicit = _epsilon(record.get("epsilon"), where=where, field=f"{field}.epsilon")
    if explicit and record.get("private") is True:
        raise _refused(where, f"{field}.epsilon", f"is {record['epsilon']!r} (no guarantee) while {field}.private is "
                                                  "true: the record contradicts itself")
    delta = record.get("delta")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, (int, float))
                              or math.isnan(delta) or not 0 <= delta < 1):
        raise _refused(where, f"{field}.delta", f"is {delta!r}; must be a number in [0, 1) or null")
    for path in _NESTED:
        inner: Any = record
        for key in path:
            inner = inner.get(key) if isinstance(inner, dict) else None
        if inner is not None:
            check_model_privacy(inner, where=where, field=".".join((field, *path)))
    return epsilon


def _epsilon(value: Any, *, where: str, field: str) -> tuple[float, bool]:
    """(epsilon, whether it is an explicit infinity) of a record's ``epsilon`` value."""
    if value is None:
        return math.inf, False
    if isinstance(value, str):
        if value.strip().lower() in INFINITE_SPELLINGS:
            return math.inf, True
        raise _refused(where, field, f"is the string {value!r}; must be a number >= 0, null or \"inf\"")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _refused(where, field, f"is {value!r}; must be a number >= 0, null or \"inf\"")
    if math.isnan(value) or value < 0:
        raise _refused(where, field, f"is {value!r}; an epsilon is a number >= 0 (0: the strongest guarantee)")
    return float(value), math.isinf(value)


def _refused(where: str, field: str, detail: str) -> DataError:
    return DataError(f"{where}: {field} {detail}. The privacy record is damaged or was edited by hand; veil "
                     "will not report it as the model's cost: copy the model again or rerun the command that wrote it")
