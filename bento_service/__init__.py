"""BentoML serving of the audited image classifier."""
