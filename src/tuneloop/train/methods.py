"""The supervised methods by name: a new one is a `Method` (train/sft.py) and one line here."""

from __future__ import annotations

from tuneloop.train.full import FULL
from tuneloop.train.lora import DORA, LORA
from tuneloop.train.qlora import QLORA

METHODS = {m.name: m for m in (LORA, DORA, QLORA, FULL)}
