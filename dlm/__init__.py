"""dlm: turn pretrained autoregressive LMs into fast block-diffusion LMs (Efficient-DLM recipe)."""

__version__ = "0.1.0"
