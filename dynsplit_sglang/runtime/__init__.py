"""Runtime glue between SGLang's attention backends and the algorithm core.

``compressor`` (the forward lifecycle), ``state``, ``rows`` (each request row's blocks),
``eviction`` and ``store`` know no SGLang type (they take tensors and a BatchView), so they are
tested against the core without a server; ``backends`` and ``batch`` adapt SGLang's backends and
forward batches to them.
"""
