"""Benchmarks: the pipeline against its own machine's limits (`make bench`,
`make bench-quick`). `bench.run` orchestrates; one module per group of
figures (ingress, worker, sink, callbacks), each with its baseline."""
