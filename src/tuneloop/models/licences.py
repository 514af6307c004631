"""Licence policy: a model whose licence the project has not allowed is refused, by name.

The catalog records each model's licence and whether it restricts fine-tuning or
redistribution; a recipe lists the licences its project allows and may accept others
explicitly. Local folders and hub ids carry no catalog licence: the user vouches for them.
"""

from __future__ import annotations

from tuneloop.errors import TuneloopError
from tuneloop.models import catalog

# Permissive licences allowed unless a recipe says otherwise.
DEFAULT_ALLOWED = ["Apache-2.0", "MIT", "BSD-3-Clause", "BSD-2-Clause"]


def check(model: str, allowed: list[str], accepted: list[str]) -> dict:
    """The model's licence record, or a TuneloopError naming the licence and how to accept it."""
    entry = catalog().get(model)
    if entry is None:
        return {"name": "unknown (not in the catalog)", "restricted": None}
    licence = entry.licence
    if licence["name"] in allowed or licence["name"] in accepted:
        return licence
    restricted = " (it restricts fine-tuning or redistribution)" if licence.get("restricted") else ""
    raise TuneloopError(
        f"model '{model}' is under the {licence['name']}{restricted}, which this recipe's licence "
        f"policy does not allow (allowed: {', '.join(allowed) or 'none'}). Read the terms; to "
        f"accept them, add to the recipe:  accept_licences: [\"{licence['name']}\"]")


def check_teachers(teachers: list[dict], allowed: list[str], accepted: list[str],
                   source: str) -> list[dict]:
    """The teachers whose outputs are in a training file, or a TuneloopError for the first one
    whose terms the policy does not allow (synthetic data carries its teacher's terms)."""
    for teacher in teachers:
        terms = teacher.get("terms")
        if terms and terms not in allowed and terms not in accepted:
            raise TuneloopError(
                f"{source} holds outputs of teacher {teacher.get('id')}, under the terms "
                f"'{terms}', which this recipe's licence policy does not allow for training "
                f"(allowed: {', '.join(allowed) or 'none'}). Read the terms; to accept them, "
                f"add to the recipe:  accept_licences: [\"{terms}\"]")
    return teachers
