"""Before and beside training: the freeze plan and its time prediction, the memory/compute
trade-offs, and the environment doctor."""
