"""The steps every mode shares: inspect, estimate, preflight (read-only), rewrite, define."""
