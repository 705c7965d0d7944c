"""Benchmarking served models: load generation, in-process baselines, the sweep and its reports; imports no stage.

`patcher bench` is the recipe in `patcher.stages.bench`, which serves a run and calls `measure`:

    report = bench_run(Path("runs/digits-ft-..."))          # serves the run itself on free ports, sweeps, writes
    report = bench_url("127.0.0.1:8001", ["digits_patched", "digits_zeroshot"])   # an already running server
    Console().print(format_table(report))

Both write `<name>.json`, `<name>.md` and `<name>.png` into out_dir (bench/results by default).
"""
