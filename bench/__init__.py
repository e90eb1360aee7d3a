"""Benchmarks: ``seedtune bench utility|step|memory|comm|server|scale|sweep|noise|robust``.

Each measures the real components (jobs, silos, the coordinator, Flower messages) and reports
against its stated targets; :func:`seedtune.bench.run.run_bench` dispatches the cost benches.
"""
