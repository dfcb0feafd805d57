"""Training: the LightningModule, the Trainer assembly, and the Lightning callbacks."""
