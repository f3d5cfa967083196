"""Where the configuration is found.

Constants only: the command line's parser names the default folder without importing the
models that validate what is in it.
"""

from __future__ import annotations

DEFAULT_CONFIG_DIR = "/etc/virt-reclaim"
DAEMON_FILE = "virt-reclaim.toml"
POLICY_FOLDER = "policies.d"
