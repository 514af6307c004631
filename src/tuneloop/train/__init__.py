"""Training methods (one file each) and the pure helpers they share."""
