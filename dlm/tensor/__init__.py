"""Pure tensor code: attention patterns, masking, the diffusion objective, exact likelihoods.
No Lightning, MLflow or I/O."""
