"""Runtime glue between SGLang's attention backends and the algorithm core.

``compressor`` and ``store`` know no SGLang type (they take tensors and a BatchView), so they are
tested against the core without a server; ``torch_native`` adapts SGLang's backend to them.
"""
