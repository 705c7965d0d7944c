"""The benchmark's default sweep (one home: the CLI and the Python API both use these)."""

DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_DURATION_S = 5.0
DEFAULT_MAX_REQUESTS = 2000
