"""Training: the one loop, image batches, augmentation, flip-sensitive ranking, freezing
schedules, data parallelism, DVCLive curves, adaptive freeze decisions."""
