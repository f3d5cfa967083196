"""Loading the daemon configuration and the policy files, with every error named and none fatal.

Each error carries the file, the policy's name, the dotted field path, the
value and the reason. Files and their folder must belong to root and not be
writable by group or others (like sshd's StrictModes): a policy decides which
guests get shut down.
"""

from __future__ import annotations

import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, ValidationError, field_validator

from virt_reclaim.config import messages
from virt_reclaim.config.fields import Duration, Model
from virt_reclaim.config.paths import DAEMON_FILE, DEFAULT_CONFIG_DIR, POLICY_FOLDER
from virt_reclaim.journal.store import DEFAULT_STATE_DIR
from virt_reclaim.logs import LogFormat
from virt_reclaim.model import DEFAULT_URI

if TYPE_CHECKING:
    from virt_reclaim.config.policy import Policy


def default_uri(environ: Mapping[str, str] | None = None) -> str:
    """The URI when neither ``--connect`` nor ``uri`` names one: virsh's choice.

    virsh and every libvirt client take $LIBVIRT_DEFAULT_URI, then their built-in default; an
    operator who set it for virsh expects the same host here.
    """
    env = os.environ if environ is None else environ
    return env.get("LIBVIRT_DEFAULT_URI") or DEFAULT_URI


class DaemonConfig(Model):
    """The daemon's configuration; every key has a default, so that no file is needed."""

    uri: str = Field(
        # A lambda: a factory with a parameter would be handed the validated fields.
        default_factory=lambda: default_uri(),  # noqa: PLW0108
        description="libvirt connection URI (default: $LIBVIRT_DEFAULT_URI, else "
        f"{DEFAULT_URI}, as virsh)",
        examples=["qemu:///system"],
    )
    policy_dir: str | None = Field(
        default=None, description="folder of policy files (default: CONFIG_DIR/policies.d)"
    )
    state_dir: str = Field(
        default=DEFAULT_STATE_DIR, description="folder of the job journal and the lock files"
    )
    log_format: LogFormat = Field(
        default=LogFormat.AUTO,
        description="log lines on stderr: json (for journald), console, or auto (console on a "
        "terminal)",
    )
    max_concurrent_jobs: int = Field(
        default=1, ge=1, le=64, description="reclaim jobs that may run at once on this host"
    )
    nice: int = Field(
        default=10, ge=0, le=19, description="CPU nice level of the rewrite (qemu-img convert)"
    )
    ionice_class: int = Field(
        default=2,
        ge=1,
        le=3,
        description="ionice class of the rewrite: 1 realtime, 2 best-effort, 3 idle (may stall "
        "a rewrite while its guest is down)",
    )
    ionice_level: int = Field(default=7, ge=0, le=7, description="level within the ionice class")
    stats_interval: Duration = Field(
        default=timedelta(seconds=60),
        description="how often to sample every domain's statistics for idle detection",
    )
    prune_removed_after: Duration = Field(
        default=timedelta(days=30),
        description="drop the journal's jobs and the metric series of a domain removed from "
        "libvirt once its last record is this old (checked at start and daily; kept backups "
        "and their jobs stay until the backups expire)",
        examples=["30d"],
    )
    qemu_img: str = Field(
        default="qemu-img", description="qemu-img program: a path, or a name looked up in PATH"
    )
    metrics_file: str = Field(
        default="",
        description="metrics for node_exporter's textfile collector, an absolute path ending "
        "in .prom (empty: none)",
        examples=["/var/lib/prometheus/node-exporter/virt_reclaim.prom"],
    )

    @field_validator("metrics_file")
    @classmethod
    def _metrics_file(cls, value: str) -> str:
        if value and not (value.startswith("/") and value.endswith(".prom")):
            raise ValueError(
                "an absolute path ending in .prom (node_exporter's textfile collector reads "
                "only those), e.g. /var/lib/prometheus/node-exporter/virt_reclaim.prom"
            )
        return value


@dataclass(frozen=True)
class ConfigError:
    """One problem in one file."""

    file: str
    policy: str | None
    field: str | None
    value: Any
    message: str
    line: int | None = None  # where TOML or the key's position gives it

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        if self.policy:
            where += f": policy {self.policy!r}"
        if self.field:
            where += f": {self.field}"
        value = "" if self.value is None else f" (value: {self.value!r})"
        return f"{where}: {self.message}{value}"

    def log_fields(self) -> dict[str, Any]:
        """The error as the fields of a ``config.error`` log event."""
        return {
            "file": self.file,
            "policy": self.policy,
            "field": self.field,
            "value": None if self.value is None else str(self.value),
            "reason": self.message,
            "line": self.line,
        }


@dataclass(frozen=True)
class LoadedConfig:
    """Everything that loaded, and every error found; callers decide what an error means."""

    daemon: DaemonConfig
    policies: tuple[tuple[str, Policy], ...]  # (file, policy)
    errors: tuple[ConfigError, ...]


def load(config_dir: str = DEFAULT_CONFIG_DIR, *, strict_modes: bool = True) -> LoadedConfig:
    """Load the daemon configuration and every policy file below ``config_dir``."""
    errors: list[ConfigError] = []
    folder = Path(config_dir)
    daemon = _load_daemon(folder / DAEMON_FILE, errors, strict_modes)
    policy_dir = Path(daemon.policy_dir) if daemon.policy_dir else folder / POLICY_FOLDER
    policies: list[tuple[str, Policy]] = []
    if policy_dir.is_dir():
        if strict_modes:
            _check_modes(policy_dir, errors)
        for path in sorted(policy_dir.glob("*.toml")):
            policies += _load_policy_file(path, errors, strict_modes)
    else:
        errors.append(ConfigError(str(policy_dir), None, None, None, "no such folder"))
    seen: dict[str, str] = {}
    for file, policy in policies:
        if policy.name in seen:
            errors.append(ConfigError(file, policy.name, "name", policy.name,
                                      f"also defined in {seen[policy.name]}"))  # fmt: skip
        seen.setdefault(policy.name, file)
    return LoadedConfig(daemon, tuple(policies), tuple(errors))


def load_daemon(config_dir: str = DEFAULT_CONFIG_DIR) -> tuple[DaemonConfig, list[ConfigError]]:
    """Only the daemon configuration (what every command needs), with its errors."""
    errors: list[ConfigError] = []
    daemon = _load_daemon(Path(config_dir) / DAEMON_FILE, errors, strict_modes=True)
    return daemon, errors


def _load_daemon(path: Path, errors: list[ConfigError], strict_modes: bool) -> DaemonConfig:
    if not path.exists():
        return DaemonConfig()
    document = _read_toml(path, errors, strict_modes)
    if document is None:
        return DaemonConfig()
    try:
        return DaemonConfig.model_validate(document)
    except ValidationError as exc:
        errors += _errors_of(str(path), exc, document, DaemonConfig)
        return _valid_part(document, exc)


def _valid_part(document: dict[str, Any], exc: ValidationError) -> DaemonConfig:
    """The keys not in error: a wrong ``nice`` must not move ``policy_dir``."""
    wrong = {error["loc"][0] for error in exc.errors() if error["loc"]}
    try:
        return DaemonConfig.model_validate({k: v for k, v in document.items() if k not in wrong})
    except ValidationError:
        return DaemonConfig()


def _load_policy_file(
    path: Path, errors: list[ConfigError], strict_modes: bool
) -> list[tuple[str, Policy]]:
    # Imported here: every command reads the daemon configuration (load_daemon), and few read the
    # policies, whose models take a tenth of a second to build and import APScheduler.
    from virt_reclaim.config.policy import PolicyFile  # noqa: PLC0415

    document = _read_toml(path, errors, strict_modes)
    if document is None:
        return []
    try:
        parsed = PolicyFile.model_validate(document)
    except ValidationError as exc:
        errors += _errors_of(str(path), exc, document, PolicyFile)
        return []
    return [(str(path), policy) for policy in parsed.policy]


def _read_toml(path: Path, errors: list[ConfigError], strict_modes: bool) -> dict[str, Any] | None:
    if strict_modes and not _check_modes(path, errors):
        return None
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        line = messages.toml_error_line(exc)
        errors.append(ConfigError(str(path), None, None, None, f"not valid TOML: {exc}", line))
    except OSError as exc:
        errors.append(ConfigError(str(path), None, None, None, f"cannot read: {exc.strerror}"))
    return None


def _check_modes(path: Path, errors: list[ConfigError]) -> bool:
    """Apply sshd's StrictModes: owned by root, not writable by group or others."""
    try:
        st = path.stat()
    except OSError as exc:
        errors.append(ConfigError(str(path), None, None, None, f"cannot stat: {exc.strerror}"))
        return False
    problems = []
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}, not root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problems.append(f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")
    if problems:
        errors.append(ConfigError(str(path), None, None, None,
                                  "refused: " + " and ".join(problems)))  # fmt: skip
        return False
    return True


def _errors_of(
    file: str,
    exc: ValidationError,
    document: dict[str, Any],
    model: type[Model],
) -> list[ConfigError]:
    result = []
    lines = messages.key_lines(file)
    for error in exc.errors(include_url=False):
        full_loc = tuple(error["loc"])
        loc = list(full_loc)
        policy = None
        if len(loc) >= 2 and loc[0] == "policy" and isinstance(loc[1], int):
            entry = _policy_entry(document, loc[1])
            policy = str(entry.get("name", f"#{loc[1] + 1}")) if isinstance(entry, dict) else None
            loc = loc[2:]
        field = ".".join(str(part) for part in loc) or None
        message = messages.explain(model, full_loc, error) or str(error["msg"]).removeprefix(
            "Value error, "
        )
        value = error.get("input") if error["type"] not in messages.NO_VALUE else None
        if isinstance(value, dict):
            value = None
        line = messages.line_of(lines, full_loc)
        result.append(ConfigError(file, policy, field, value, message, line))
    return result


def _policy_entry(document: dict[str, Any], index: int) -> Any:  # noqa: ANN401 - raw TOML
    entries = document.get("policy")
    if isinstance(entries, list) and index < len(entries):
        return entries[index]
    return None
