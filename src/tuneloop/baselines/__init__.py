"""Prompting baselines: what the base model does without fine-tuning, scored like a run.

zero-shot (the instruction names the labels / fields), few-shot (k training rows as examples)
and many-shot (as many rows as fit the context). Fine-tuning is worth it only where a run
beats the best of them; see `strategies.py` for the registry and `shots.py` for prompts.
"""
