"""The coordinator: seeds, schedule, aggregation, the update log, resume and evaluation."""
