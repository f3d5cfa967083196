"""The configuration: the daemon's own, policy files, which policy selects a domain, cron."""
