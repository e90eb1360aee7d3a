"""The ``seedtune`` command: parses arguments, calls a job or a bench, prints its report."""
