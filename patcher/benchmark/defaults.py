"""The benchmark's default sweep (one home: the CLI and the Python API both use these)."""

DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_DURATION_S = 5.0
DEFAULT_MAX_REQUESTS = 2000
INT8_KIND = "patched_int8"  # the int8 patched graph, served beside the float32 one as `<name>_patched_int8`
