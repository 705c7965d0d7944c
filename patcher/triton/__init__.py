"""Serve an export with NVIDIA Triton, in three parts that share only the names in `repository/configs.py`:

- `repository/`: the model repository writer (one builder per model kind, an all-or-nothing publish under a
  journal, the python-backend model code it copies in);
- `serving/`: the bundled tritonserver as a process (ports, keyed control plane, supervisor that rolls out new
  versions and restarts what died);
- `client.py`: gRPC classification against any Triton serving such a repository.

None of them imports torch or open_clip: `patcher triton`, `patcher serve` and `patcher classify` stay light.
"""
