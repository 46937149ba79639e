"""Lightning-side pieces: the LightningModule, optimisation, safe checkpoints, config checks."""
