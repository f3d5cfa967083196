"""Allow ``python -m virt_reclaim``."""

from virt_reclaim.cli import main

raise SystemExit(main())
