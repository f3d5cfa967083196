"""The steps every mode shares: inspect, estimate and preflight (prepare), rewrite, define."""
