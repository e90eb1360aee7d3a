"""The privacy path: Poisson sampling, per-example clipping, secret Gaussian noise, events,
accounting and the durable, budget-enforcing ledger."""
