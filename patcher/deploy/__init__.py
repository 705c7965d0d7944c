"""`patcher deploy`: Kubernetes manifests for NVIDIA's Triton container serving a patcher repository."""
