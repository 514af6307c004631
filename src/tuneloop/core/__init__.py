"""Primitives below every stage: row formats, chat-template tokenization, batching, atomic
writes, free ports. Nothing here imports a stage (tests/test_layout.py checks it)."""
