"""The KD engine: config, data, augmentation, losses, mappings, trainer."""
