"""Lightning callbacks: HF export at the end of training; evaluation, benchmarks and drift during
it."""
