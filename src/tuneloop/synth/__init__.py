"""Synthetic data from a teacher model: labelling, answering, expanding, preference pairs."""
