"""Drivers that run on the driver only: a job, a second pass, an evaluation; the lease and preflight."""
