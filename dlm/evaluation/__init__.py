"""Evaluation: the lm-eval model class, task resolution with offline variants, `dlm eval`."""
