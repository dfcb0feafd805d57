"""Every settings dataclass (experiment, decode, bench, eval, sweep), one validation helper and one error formatter."""
