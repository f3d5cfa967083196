"""Policy files: every field's valid and invalid values, error locations, the loader, the schema."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from virt_reclaim.config import loading, selection
from virt_reclaim.config.policy import Policy, PolicyFile, job_settings
from virt_reclaim.job.settings import After, Compression, JobHooks, JobSettings

ROOT = Path(__file__).resolve().parents[3]
MINIMAL = {"name": "p", "match": {"names": ["web-*"]}, "schedule": {"cron": "0 2 * * *"}}


def with_field(path: str, value: Any) -> dict[str, Any]:
    """MINIMAL with the dotted ``path`` set to ``value``."""
    policy: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in MINIMAL.items()}
    *parents, last = path.split(".")
    node = policy
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return policy


VALID = [
    ("enabled", False), ("priority", -5), ("mode", "live"), ("after", "start"),
    ("match.uuids", ["4DC0E6C8-12C3-4B2E-9E55-8F0C8B1F4A10"]), ("match.exclude", ["db-*"]),
    ("schedule.timezone", "Europe/Berlin"), ("schedule.window", "90m"), ("schedule.jitter", "30s"),
    ("schedule.min_interval", "7d"), ("idle.cpu_percent", 0), ("idle.disk_bytes_per_s", "1MiB"),
    ("idle.duration", 600), ("idle.no_logged_in_users", True), ("free_space.method", "zero"),
    ("free_space.timeout", "1h"), ("shutdown.timeout", "30s"), ("shutdown.on_timeout", "force"),
    ("rewrite.compression", "zlib"), ("rewrite.cluster_size", "64KiB"),
    ("rewrite.min_gain", "500MB"), ("rewrite.min_gain_percent", 12.5),
    ("rewrite.keep_backup", "2d"),
    ("hooks.before_shutdown", ["/etc/virt-reclaim/hooks/silence", "create"]),
    ("hooks.after_job", ["logger", "-t", "virt-reclaim"]), ("hooks.timeout", "2m"),
]  # fmt: skip

INVALID = [
    ("name", "has space", "should match pattern"),
    ("enabled", "yes please", "valid boolean"),
    ("priority", "high", "valid integer"),
    ("mode", "hot", "'offline' or 'live'"),
    ("after", "sometimes", "'previous', 'start' or 'off'"),
    ("match.uuids", ["not-a-uuid"], "not UUIDs: not-a-uuid"),
    ("match.typo", 1, "unknown key `match.typo`; valid keys here: exclude, metadata, names"),
    ("schedule.cron", "61 2 * * *", "cron '61 2 * * *'"),
    ("schedule.cron", "0 2 * *", "Wrong number of fields"),
    ("schedule.timezone", "Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("schedule.window", "soon", "a duration like 30s, 15m, 2h or 7d"),
    ("schedule.jitter", True, "not a boolean"),
    ("idle.cpu_percent", 150, "less than or equal to 100"),
    ("idle.disk_bytes_per_s", "fast", "a size like 512MiB, 2GiB or 500MB"),
    ("rewrite.min_gain", "10 GB please", "a number and one unit, nothing else"),
    ("free_space.method", "shred", "'auto', 'trim', 'zero' or 'none'"),
    ("shutdown.on_timeout", "pray", "'abort' or 'force'"),
    ("rewrite.compression", "lz4", "'zstd', 'zlib' or 'none'"),
    ("rewrite.cluster_size", "64K", "64000 bytes: a power of two"),
    ("rewrite.min_gain_percent", -1, "greater than or equal to 0"),
    ("rewrite.preallocation", "full", "'off' or 'metadata'"),
    ("hooks.before_shutdown", "/etc/virt-reclaim/hooks/silence create",
     'a list of strings, the program and its arguments (no shell): '
     '["/etc/virt-reclaim/hooks/silence create"] or'),
    ("hooks.befor_shutdown", ["/bin/true"],
     "unknown key `hooks.befor_shutdown`; did you mean `hooks.before_shutdown`?"),
    ("hooks.after_job", [], "an empty list: give the program and its arguments"),
    ("hooks.after_job", ["hooks/notify"], "an absolute path or a bare name found in PATH"),
    ("hooks.after_job", ["/bin/sleep", 60], "every element is a string"),
    ("hooks.timeout", "0s", "a positive duration"),
    ("hooks.timeout", "soon", "a duration like 30s, 15m, 2h or 7d"),
]  # fmt: skip


def validate(policy: dict[str, Any]) -> list[loading.ConfigError]:
    document = {"policy": [policy]}
    try:
        PolicyFile.model_validate(document)
    except ValidationError as exc:
        return loading._errors_of("f.toml", exc, document, PolicyFile)
    return []


@pytest.mark.parametrize(("path", "value"), VALID)
def test_valid_values(path: str, value: Any) -> None:
    assert validate(with_field(path, value)) == []


@pytest.mark.parametrize(("path", "value", "message"), INVALID)
def test_invalid_values_name_file_policy_field_and_value(
    path: str, value: Any, message: str
) -> None:
    errors = validate(with_field(path, value))
    assert len(errors) == 1, errors
    [error] = errors
    assert (error.file, error.policy, error.field) == (
        "f.toml",
        "p" if path != "name" else "has space",
        path,
    )
    assert message in error.message, error.message
    assert error.value == value
    assert str(error).startswith(f"f.toml: policy '{error.policy}': {path}: ")


def test_cross_field_rules() -> None:
    [short] = validate(with_field("schedule.window", "1m"))
    assert "shorter than shutdown.timeout" in short.message
    [prealloc] = validate(with_field("rewrite.preallocation", "metadata"))
    assert prealloc.message == "compression and preallocation exclude each other"
    uncompressed = {"preallocation": "metadata", "compression": "none"}
    assert validate({**MINIMAL, "rewrite": uncompressed}) == []


def test_job_settings_follow_the_policy_and_explicit_options_win() -> None:
    policy = Policy.model_validate(with_field("rewrite", {
        "compression": "none", "preallocation": "metadata", "min_gain": "2GiB",
        "keep_backup": "1d"}) | {"after": "off", "shutdown": {"timeout": "45s"}})  # fmt: skip
    settings = job_settings(policy)
    assert (settings.compression, settings.preallocation, settings.min_gain) == (
        Compression.NONE,
        "metadata",
        2 * 1024**3,
    )
    assert (settings.keep_backup, settings.after, settings.shutdown_timeout_s) == (
        86400.0,
        After.OFF,
        45.0,
    )
    assert job_settings(policy, shutdown_timeout_s=10.0, min_gain=None).shutdown_timeout_s == 10
    defaults = job_settings(Policy.model_validate(MINIMAL))
    assert defaults == JobSettings()
    assert defaults.hooks == JobHooks()
    assert defaults.keep_backup is None


def test_job_settings_carry_the_policys_hooks() -> None:
    hooks = {"before_shutdown": ["/etc/hooks/silence", "create"], "after_job": ["logger", "done"],
             "timeout": "90s"}  # fmt: skip
    settings = job_settings(Policy.model_validate(with_field("hooks", hooks)))
    assert settings.hooks == JobHooks(
        before_shutdown=("/etc/hooks/silence", "create"), after_job=("logger", "done"),
        timeout_s=90.0,
    )  # fmt: skip


def test_a_policy_must_select_something() -> None:
    [error] = validate({**MINIMAL, "match": {}})
    assert (error.field, error.message) == (
        "match",
        "selects nothing: give names, uuids or metadata",
    )


def test_missing_required_fields() -> None:
    errors = validate({"name": "bare"})
    assert {(e.field, e.message) for e in errors} == {
        ("match", "Field required"), ("schedule", "Field required")}  # fmt: skip
    assert all(e.value is None for e in errors)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(["name", "enabled", "priority", "mode", "match", "schedule", "idle",
                               "free_space", "shutdown", "rewrite", "after", "bogus"])  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=8))
def test_any_document_gives_a_model_or_errors_never_an_exception(doc: dict[str, Any]) -> None:
    for error in validate(doc):
        assert error.message and error.file == "f.toml"


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(VALID), st.sampled_from(INVALID))
def test_one_broken_field_among_valid_ones_is_the_only_error(
    good: tuple[str, Any], bad: tuple[str, Any, str]
) -> None:
    if good[0] == bad[0] or good[0].split(".")[0] == bad[0] == "mode":
        return
    policy = with_field(good[0], good[1])
    *parents, last = bad[0].split(".")
    node = policy
    for part in parents:
        node[part] = dict(node.get(part, {}))
        node = node[part]
    node[last] = bad[1]
    errors = validate(policy)
    assert [e.field for e in errors] == [bad[0]]


def write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o755)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_loader_reports_every_error_of_every_file_and_keeps_the_good(tmp_path: Path) -> None:
    write(tmp_path / "virt-reclaim.toml", 'max_concurrent_jobs = 0\nlog_format = "xml"\n')
    good = '[[policy]]\nname = "good"\nmatch.names = ["{}*"]\nschedule.cron = "0 1 * * *"\n'
    write(tmp_path / "policies.d/a.toml", good.format("a"))
    write(tmp_path / "policies.d/b.toml",
          '[[policy]]\nname = "bad"\nmatch.names = ["b*"]\nschedule.cron = "0 25 * * *"\n'
          'idle.cpu_percent = 200\n')  # fmt: skip
    write(tmp_path / "policies.d/c.toml", "this is = not [toml\n")
    write(tmp_path / "policies.d/d.toml", good.format("d"))

    loaded = loading.load(str(tmp_path))

    messages = [str(e) for e in loaded.errors]
    daemon = str(tmp_path / "virt-reclaim.toml")
    assert any(m.startswith(f"{daemon}:1: max_concurrent_jobs: ") for m in messages)
    assert any(m.startswith(f"{daemon}:2: log_format: ") for m in messages)
    assert any("b.toml:5: policy 'bad': idle.cpu_percent: " in m for m in messages)
    assert any("c.toml:1: not valid TOML" in m for m in messages)
    assert any("d.toml: policy 'good': name: also defined in" in m for m in messages)
    assert [p.name for _f, p in loaded.policies] == ["good", "good"]


def test_files_writable_by_others_or_not_root_owned_are_refused(tmp_path: Path) -> None:
    good = '[[policy]]\nname = "p"\nmatch.names = ["a*"]\nschedule.cron = "0 1 * * *"\n'
    write(tmp_path / "policies.d/open.toml", good, mode=0o666)
    owned = write(tmp_path / "policies.d/owned.toml", good.replace('"p"', '"q"'))
    os.chown(owned, 1000, 1000)
    loaded = loading.load(str(tmp_path))
    messages = [str(e) for e in loaded.errors]
    assert any("open.toml: refused: writable by group or others (mode 666)" in m for m in messages)
    assert any("owned.toml: refused: owned by uid 1000, not root" in m for m in messages)
    assert loaded.policies == ()


def test_check_accepts_the_examples_and_the_schema_validates_them() -> None:
    result = subprocess.run([sys.executable, "-m", "virt_reclaim", "check", "--config-dir",
                             str(ROOT / "config"), "--connect", "test:///default"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "weekly-web" in result.stdout and "monthly-tagged" in result.stdout
    schema = json_schema()
    for path in sorted((ROOT / "config/policies.d").glob("*.toml")):
        jsonschema.validate(tomllib.loads(path.read_text()), schema)


def json_schema() -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "virt_reclaim", "schema"], capture_output=True,
                         text=True, timeout=60, check=True).stdout  # fmt: skip
    schema: dict[str, Any] = json.loads(out)
    return schema


def test_schema_describes_every_field() -> None:
    schema = json_schema()
    for name, definition in schema["$defs"].items():
        for field, spec in definition.get("properties", {}).items():
            assert spec.get("description"), f"{name}.{field} has no description"


def test_check_exits_2_with_every_error(tmp_path: Path) -> None:
    write(tmp_path / "policies.d/x.toml", '[[policy]]\nname = "x"\nmatch.names = ["*"]\n'
          'schedule.cron = "nope"\nrewrite.compression = "lz4"\n')  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "virt_reclaim", "check", "--config-dir",
                             str(tmp_path), "--connect", "test:///default"],
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "x.toml:5: policy 'x': rewrite.compression:" in result.stderr
    assert "x.toml:4: policy 'x': schedule.cron:" in result.stderr
    assert "Traceback" not in result.stderr


def test_selection_by_glob_uuid_exclusion_metadata_and_priority() -> None:
    def policy(name: str, priority: int = 0, **match: Any) -> Policy:
        return Policy.model_validate({"name": name, "priority": priority, "match": match,
                                      "schedule": {"cron": "0 1 * * *"}})  # fmt: skip

    uuid = "4dc0e6c8-12c3-4b2e-9e55-8f0c8b1f4a10"
    xml = ("<domain><name>web-1</name><metadata><r:reclaim xmlns:r='urn:x'>yes</r:reclaim>"
           "</metadata></domain>")  # fmt: skip
    web = policy("web", names=["web-*"], exclude=["web-db*"])
    by_uuid = policy("by-uuid", priority=5, uuids=[uuid.upper()])
    tagged = policy("tagged", metadata={"namespace": "urn:x", "element": "reclaim", "value": "yes"})
    assert selection.matches(web.match, "web-1", "u", "<domain/>")
    assert not selection.matches(web.match, "web-db1", "u", "<domain/>")
    assert selection.matches(tagged.match, "x", "u", xml)
    assert not selection.matches(tagged.match, "x", "u", xml.replace(">yes<", ">no<"))
    assert selection.select([web, by_uuid], "web-1", uuid, "<domain/>").policy == by_uuid
    tie = selection.select([web, tagged], "web-1", "u", xml)
    assert tie.policy is None and tie.conflict == ("web", "tagged")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virt_reclaim", *args], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip


def test_commands_follow_the_daemon_settings_and_options_win(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write(tmp_path / "virt-reclaim.toml", f'uri = "test:///default"\nstate_dir = "{state}"\n')
    domains = cli("domains", "--json", "--config-dir", str(tmp_path))
    assert domains.returncode == 0, domains.stderr
    assert [d["name"] for d in json.loads(domains.stdout)] == ["test"]
    assert cli("history", "--config-dir", str(tmp_path)).returncode == 0
    assert (state / "journal.sqlite3").exists()
    other = tmp_path / "other"
    assert cli("history", "--config-dir", str(tmp_path), "--state-dir", str(other)).returncode == 0
    assert (other / "journal.sqlite3").exists()


def test_an_invalid_daemon_file_stops_run_but_not_history(tmp_path: Path) -> None:
    state = tmp_path / "state"
    write(tmp_path / "virt-reclaim.toml", f'nice = 40\nstate_dir = "{state}"\n')
    result = cli("run", "test", "--dry-run", "--config-dir", str(tmp_path))
    assert result.returncode == 2
    assert "the daemon settings are not valid" in result.stderr
    assert "virt-reclaim.toml:1: nice: " in result.stderr
    history = cli("history", "--config-dir", str(tmp_path))
    assert history.returncode == 0, history.stderr
    assert "going on with the valid ones" in history.stderr
    assert (state / "journal.sqlite3").exists()  # the state_dir of the file, not the default
