"""What a run shows: the report and its tables, method labels, offline plots."""
