"""The configuration: daemon settings, policy files, which policy selects a domain, cron."""
