"""Data: the synthetic task, tokenizing and packing, the LightningDataModule,
prompt sets for decoding."""
