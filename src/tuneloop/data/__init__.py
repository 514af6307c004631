"""Data in: formats and validation, then tokenization and batching for training."""
