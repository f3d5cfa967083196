"""The daemon: its loop, windows, idle checks, host view, workers, scheduler, wake-up, notify."""
