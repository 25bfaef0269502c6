"""Training, evaluation and I/O machinery shared by the stage scripts (knows nothing of raw dataset formats)."""
