"""Experiments: sweeps (schema expansion, runner, launchers), their report and figures, training
benchmarks."""
