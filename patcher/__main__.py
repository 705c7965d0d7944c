"""`python -m patcher ...` and `torchrun --nproc-per-node N -m patcher build ...`."""

from patcher.cli import main

main()
