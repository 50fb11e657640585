"""Training recipes: one LightningModule per stage (the architectures live one level up)."""
