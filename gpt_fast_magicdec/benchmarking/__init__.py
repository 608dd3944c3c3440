"""Benchmarks of the engine, out of the kernels and the engine themselves (issue 13).

- `report`: provenance of a measurement (git commit, device name, date) and number formatting.
- `sweep`: bench.py's sweep, plain vs speculative decoding with paired, interleaved timing.
- `sweep_report`: its results.json / results.md / speedup_vs_batch.png, and --merge.
- `kernels`: the decode-attention micro-benchmark (bench.py --kernels); `kernel_report` its report.

The scripts (bench.py, benchmarks/*.py) are short users of these modules."""
