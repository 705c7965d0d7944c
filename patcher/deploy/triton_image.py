"""What `patcher deploy` deploys unless told otherwise (no imports: the CLI reads these at start-up)."""

TRITON_IMAGE = "nvcr.io/nvidia/tritonserver"
TRITON_TAG = "24.10-py3"  # Triton 2.51, the version patcher's bundled server is
