"""MLflow: the default store, the run file beside an export, run lookup, and logging helpers."""
