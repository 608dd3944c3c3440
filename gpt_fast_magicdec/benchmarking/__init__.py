"""Benchmarks of the engine, out of the kernels and the engine themselves.

- `report`: provenance of a measurement (git commit, device name, date) and number formatting.
- `sweep`: bench.py's sweep, plain vs speculative decoding with paired, interleaved timing.
- `sweep_report`: its results.json / results.md / speedup_vs_batch.png, and --merge.
- `kernels`: the decode-attention micro-benchmark (bench.py --kernels); `kernel_report` its report.
- `job`: a ragged batch job, static batches against in-flight refill (bench.py --job).
- `environment`: the device's versions and measured ceilings (the first-light command's first stage).

The scripts (bench.py, benchmarks/*.py) are short users of these modules."""
