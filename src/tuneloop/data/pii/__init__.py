"""Personal data: find it with Presidio's analyzer, replace it with Presidio's anonymizer.

Two layers and a rule feed one list of candidates:
- patterns with checksums (Presidio's recognizers): e-mail, phone (libphonenumber), credit card
  (Luhn), IBAN (mod 97), IP, URL, US SSN, UK NINO, and numeric dates (11/22/2000, 2000-11-22);
- a token-classification model for people, organizations, places and addresses, dates, ages and
  nationality/religious/political groups (and structured values by their context), which
  tuneloop fine-tunes once from the MiniLM encoder it ships and caches (pii_model.py);
and below both, a rule for a capitalized name before a possessive 's (`possessors`).
Where they overlap, the validated pattern wins, then the model.

Replacements are consistent within an example: the same person is `<PERSON_1>` in the prompt,
the reply and the extracted fields. `fake` mode puts realistic stand-ins (Faker, seeded by the
original so reruns agree) instead; `reversible` mode keeps the placeholder → original map,
encrypted (Fernet) with a key that stays in the workspace.
"""

from __future__ import annotations

from tuneloop.data.pii.detect import (ENTITY_TYPES, MODES, PATTERN_TYPES, Detector, Finding,
                                      possessors)
from tuneloop.data.pii.files import anonymize_file, reidentify_file, scan_file
from tuneloop.data.pii.replace import Replacer, anonymize_rows, anonymize_text, propagate
from tuneloop.data.pii.reversible import key_path, map_path, read_map, restore, write_map

__all__ = ["ENTITY_TYPES", "MODES", "PATTERN_TYPES", "Detector", "Finding", "Replacer",
           "anonymize_file", "anonymize_rows", "anonymize_text", "key_path", "map_path",
           "possessors", "propagate", "read_map", "reidentify_file", "restore", "scan_file",
           "write_map"]
