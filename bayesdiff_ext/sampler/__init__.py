"""The BayesDiff sampler: the scheduler loop with per-pixel moments carried alongside (SPEC §2)."""
