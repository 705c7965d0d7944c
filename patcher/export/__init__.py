"""ONNX export of a run: patched and zero-shot classifiers with their heads baked in, parity-checked.

`contract.py` (imports no torch) is what serving reads; `graph.py`, `trace.py`, `variants.py`, `heldout.py`,
`parity.py`, `verify.py` and `metadata.py` make and check the files; the stage itself is `stages/export.py`.
"""
