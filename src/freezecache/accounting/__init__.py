"""What a run costs: FLOPs, memory, a method's costs per freezing state, where its wall time
goes, and how sure a gap between methods is."""
