"""The benchmark's defaults: the sweep and the served repository's batching delay (one home: the CLI, the Python API
and the bench scripts use these)."""

DEFAULT_CONCURRENCY = (1, 2, 4, 8)
DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_DURATION_S = 5.0
DEFAULT_MAX_REQUESTS = 2000
INT8_KIND = "patched_int8"  # the int8 patched graph, served beside the float32 one as `<name>_patched_int8`
DEFAULT_MAX_QUEUE_DELAY_US = 0  # measured: 2000 makes every request wait 2 ms at low concurrency (bench/README.md)
