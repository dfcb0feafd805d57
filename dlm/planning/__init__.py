"""`dlm plan`: memory per GPU, FLOPs per token and wall time of a training config, from the
backbone's shapes on the meta device (no weights, no download)."""
