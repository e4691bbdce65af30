"""Evaluation benchmarks from their upstream sources: ``freelm data prepare NAME...`` / ``freelm data list``.

``sources`` is the registry (one converter per benchmark, registered by name,
with its pinned revision); ``fetch`` gets the upstream files (Hub, GitHub or a
local copy) and fails fast without network; ``prepare`` writes the JSONL files
and ``MANIFEST.json``; ``cli`` is the command line. Nothing here imports
``datasets``/``pyarrow`` or ``huggingface_hub`` until a file is fetched or read.
"""

from __future__ import annotations

from freelm.benchmarks.sources import BENCHMARKS, Benchmark, BenchmarkDataError, RowRef, Source

__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkDataError", "RowRef", "Source"]
