"""The benchmark suite: each figure next to a baseline measured in the same run.

Run ``python -m embedd.bench [--size small|full] [--json PATH] [NAME ...]``.
Absolute times on a shared machine are noise; the ratios against a baseline run
on the same machine a moment later are the figures that mean something.

Modules, one benchmark each, plus the shared plumbing:

- :mod:`~embedd.bench.collect`: a batch output file to ``.npy``, embedd's path
  (base64 lines parsed in slices) against float JSON loaded whole.
- :mod:`~embedd.bench.pipeline`: ``intake`` (inbox to uploaded batch file against
  the tiktoken-only floor) and ``e2e`` (inbox to ``.npy`` through the real daemon
  and the emulator, at two sizes to show how time and memory grow).
- :mod:`~embedd.bench.sync`: the sync lane under 5x demand against an emulator
  enforcing TPM, against a fixed-concurrency client that sleeps after a 429.
- :mod:`~embedd.bench.common`: corpus, subprocesses, peak RSS, daemon and emulator.
- :mod:`~embedd.bench.worker`: one side of a benchmark in a fresh interpreter, so
  its peak RSS is its own.
"""
