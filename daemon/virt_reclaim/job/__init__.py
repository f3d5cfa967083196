"""A reclaim job: its frame, context, settings, results and ports, the domain lock."""
