"""The free-space step: trim or a bounded zero-fill through the agent, its budget, its watches."""
