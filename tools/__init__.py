"""Developer tools: peers (tgtd, our target), conformance runner, benchmarks.

Nothing here is imported by the ``iscsi``/``vmfs``/``hypervisor`` packages; tests and people use it.
"""
