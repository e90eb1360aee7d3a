"""The ``seedtune`` command: wires silos and the coordinator together for each way of running."""
