"""``check`` tells everything at once; ``schema`` says only what ``check`` accepts.

Every error of every file (daemon settings and policies together, with file:line,
the unknown key and the nearest valid one, the cron field), the warnings (exit 0),
each policy's next window, ``--json``, and a schema whose defaults and examples,
written into files, pass ``check``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from virt_reclaim.cli import main
from virt_reclaim.config import crontab, loading
from virt_reclaim.config.policy import Policy, PolicyFile
from virt_reclaim.reports.check import next_window, shortest_gap, surprising_settings

CRON_DAILY = "0 2 * * *"
# Thursday, 3 December 2026, 12:00 UTC
NOW = dt.datetime(2026, 12, 3, 12, 0, tzinfo=dt.UTC)


def folder(tmp_path: Path, files: dict[str, str]) -> Path:
    """A configuration folder as check wants it (root's, not writable by others)."""
    (tmp_path / "policies.d").mkdir(parents=True, exist_ok=True)
    for path in (tmp_path, tmp_path / "policies.d"):
        path.chmod(0o755)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        (tmp_path / name).chmod(0o644)
    return tmp_path


def check(capsys: pytest.CaptureFixture[str], directory: Path, *args: str) -> tuple[int, str, str]:
    """Run ``virt-reclaim check`` in this process: exit status, stdout, stderr."""
    status = main(["check", "--config-dir", str(directory), "--connect", "test:///default", *args])
    out, err = capsys.readouterr()
    return status, out, err


def policy(**fields: Any) -> Policy:
    base: dict[str, Any] = {"name": "p", "match": {"names": ["*"]},
                            "schedule": {"cron": CRON_DAILY, "timezone": "UTC",
                                         "min_interval": "20h"}}  # fmt: skip
    for key, value in fields.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return Policy.model_validate(base)


BROKEN_POLICIES = """\
[[policy]]
name = "a"
match.names = ["a*"]
match.exlude = ["x"]
schedule.cron = "0 25 * * *"
rewrite.min_gain = "10 GB please"

[[policy]]
name = "b"
match.names = ["b*"]
[policy.schedule]
cron = "0 2 * * *"
windw = "4h"
"""


def test_every_error_of_every_file_at_once_with_line_and_advice(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = folder(tmp_path, {
        "virt-reclaim.toml": "nice = 40\nmax_concurent_jobs = 2\n",
        "policies.d/a.toml": BROKEN_POLICIES,
        "policies.d/b.toml": '[policy]\nname = "c"\n',
        "policies.d/c.toml": "x = [\n",
    })  # fmt: skip

    status, _out, err = check(capsys, directory)

    assert status == 2
    daemon, a, b = (str(directory / n) for n in ("virt-reclaim.toml", "policies.d/a.toml",
                                                  "policies.d/b.toml"))  # fmt: skip
    expected = [
        f"error: {daemon}:1: nice: Input should be less than or equal to 19 (value: 40)",
        f"error: {daemon}:2: max_concurent_jobs: unknown key `max_concurent_jobs`; did you mean "
        "`max_concurrent_jobs`?",
        f"error: {a}:4: policy 'a': match.exlude: unknown key `match.exlude`; did you mean "
        "`match.exclude`?",
        f"error: {a}:5: policy 'a': schedule.cron: cron '0 25 * * *': hour field '25': the last "
        "value (25) is higher than the maximum value (23) (allowed: 0-23)",
        f"error: {a}:6: policy 'a': rewrite.min_gain: a size like 512MiB, 2GiB or 500MB",
        f"error: {a}:13: policy 'b': schedule.windw: unknown key `schedule.windw`; did you mean "
        "`schedule.window`?",
        f"error: {b}:1: policy: [policy] is a single table; write [[policy]] (an array of tables)",
        "c.toml: not valid TOML",
    ]
    for line in expected:
        assert line in err, f"{line}\n---\n{err}"
    assert "virt-reclaim: 8 error(s) and 0 warning(s)" in err


def test_hooks_in_a_policy_table_and_their_errors_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = """[[policy]]
name = "a"
match.names = ["a*"]
schedule.cron = "0 2 * * *"
[policy.hooks]
before_shutdown = ["/etc/virt-reclaim/hooks/silence", "create"]
after_job = ["/etc/virt-reclaim/hooks/silence", "expire"]
timeout = "30s"
"""
    status, _out, err = check(capsys, folder(tmp_path / "good", {"policies.d/a.toml": good}))
    assert status == 0, err
    bad = good.replace(
        '["/etc/virt-reclaim/hooks/silence", "create"]', '"/etc/virt-reclaim/hooks/silence create"'
    ).replace("timeout", "timout")
    directory = folder(tmp_path / "bad", {"policies.d/a.toml": bad})

    status, _out, err = check(capsys, directory)

    assert status == 2
    where = f"error: {directory / 'policies.d/a.toml'}"
    assert (
        f"{where}:6: policy 'a': hooks.before_shutdown: a list of strings, the program and its "
        'arguments (no shell): ["/etc/virt-reclaim/hooks/silence create"]'
    ) in err, err
    assert (
        f"{where}:8: policy 'a': hooks.timout: unknown key `hooks.timout`; did you mean "
        "`hooks.timeout`?"
    ) in err, err


@pytest.mark.parametrize(
    ("cron", "named"),
    [
        ("61 2 * * *", "minute field '61'"),
        ("0 24 * * *", "hour field '24'"),
        ("0 2 32 * *", "day of month field '32'"),
        ("0 2 * 13 *", "month field '13'"),
        ("0 2 * * 8", "day of week field '8'"),
        ("0 2 * * funday", "day of week field 'funday'"),
    ],
)
def test_the_bad_cron_field_is_named_with_its_range(cron: str, named: str) -> None:
    with pytest.raises(ValueError, match=f"^{named}: .*\\(allowed: ") as caught:
        crontab.trigger(cron, "UTC")
    assert "allowed: " in str(caught.value)


@pytest.mark.parametrize("size", ["10 GB please", "10 xGB", "GiB", "1,5GiB", "10 GB 5"])
def test_sizes_are_strict(size: str) -> None:
    with pytest.raises(ValueError, match="a number and one unit"):
        policy(rewrite={"min_gain": size})


@pytest.mark.parametrize(
    ("size", "bytes_"),
    [("10GB", 10**10), ("1.5GiB", 3 * 2**29), ("64 KiB", 65536), ("512", 512), (4096, 4096)],
)
def test_sizes_people_write_still_pass(size: str | int, bytes_: int) -> None:
    assert int(policy(rewrite={"min_gain": size}).rewrite.min_gain) == bytes_


def test_unknown_key_without_a_close_one_lists_the_valid_ones() -> None:
    errors = loading._errors_of("f.toml", _error({"policy": [{"name": "p", "zzz": 1}]}),
                               {"policy": [{"name": "p", "zzz": 1}]}, PolicyFile)  # fmt: skip
    [unknown] = [e for e in errors if e.field == "zzz"]
    assert unknown.message.startswith("unknown key `zzz`; valid keys here: after, enabled, ")


def _error(document: dict[str, Any]) -> ValidationError:
    try:
        PolicyFile.model_validate(document)
    except ValidationError as exc:
        return exc
    raise AssertionError("valid")


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"schedule": {"window": "30h"}},
         "schedule.window (30h) is longer than the 1d between two starts of '0 2 * * *'"),
        ({"mode": "live", "idle": {"required": False}},
         "idle.required = false without rewrite.rate_limit"),
        ({"mode": "live", "rewrite": {"convert": True}}, "rewrite.convert needs the guest off"),
        ({"mode": "live", "guest": {"enable_discard": True}},
         "guest.enable_discard needs the guest off"),
        ({"schedule": {"cron": CRON_DAILY, "timezone": "UTC"}},
         "schedule.min_interval is not set: the default 7d applies, so a domain is reclaimed at "
         "most once in 7d although '0 2 * * *' starts every 1d"),
        ({"schedule": {"cron": CRON_DAILY, "min_interval": "20h"}},
         "schedule.timezone is not set: '0 2 * * *' is read in UTC"),
    ],
)  # fmt: skip
def test_surprising_settings_are_warned_of(fields: dict[str, Any], expected: str) -> None:
    if "schedule" in fields and "window" not in fields["schedule"]:
        fields = {**fields, "schedule": fields["schedule"]}
        base = {"name": "p", "match": {"names": ["*"]}, **fields}
        warnings = surprising_settings(Policy.model_validate(base), NOW)
    else:
        warnings = surprising_settings(policy(**fields), NOW)
    assert [w for w in warnings if w.startswith(expected)], warnings
    assert len(warnings) == 1, warnings


def test_settings_that_fit_give_no_warning() -> None:
    assert surprising_settings(policy(), NOW) == []
    rate_limited = policy(mode="live", idle={"required": False}, rewrite={"rate_limit": "50MiB"})
    assert surprising_settings(rate_limited, NOW) == []
    # A monthly cron: the default 7 days between reclaims changes nothing.
    monthly = Policy.model_validate(
        {"name": "m", "match": {"names": ["*"]},
         "schedule": {"cron": "0 2 1 * *", "timezone": "UTC"}}
    )  # fmt: skip
    assert surprising_settings(monthly, NOW) == []
    # Weekdays only: the shortest gap is a day, not the 3 days over the weekend.
    assert shortest_gap("0 2 * * 1-5", NOW) == dt.timedelta(days=1)


def test_the_next_window_in_the_policys_time_zone() -> None:
    berlin = policy(schedule={"cron": "0 1 * * sun", "timezone": "Europe/Berlin", "window": "4h"})
    window = next_window(berlin, NOW)
    assert window is not None and not window.open_now
    assert (window.start.isoformat(), window.end.isoformat()) == (
        "2026-12-06T01:00:00+01:00", "2026-12-06T05:00:00+01:00")  # fmt: skip
    assert str(window) == "next window Sun 2026-12-06 01:00 to 05:00 CET"
    during = next_window(berlin, dt.datetime(2026, 12, 6, 1, 30, tzinfo=dt.UTC))
    assert during is not None and during.open_now
    assert str(during) == "open now until Sun 2026-12-06 05:00 CET"


def test_check_shows_windows_and_domains_and_warnings_pass(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = folder(tmp_path, {"policies.d/t.toml": (
        '[[policy]]\nname = "t"\nmatch.names = ["te*"]\nschedule.cron = "0 2 * * *"\n'
        'schedule.window = "30h"\nschedule.timezone = "Europe/Berlin"\n'
        'schedule.min_interval = "1d"\n')})  # fmt: skip

    status, out, err = check(capsys, directory)

    assert status == 0, err
    assert out.startswith(f"t  [{directory / 'policies.d/t.toml'}, priority 0]: test\n")
    # The 30 h window may be open at the time the test runs.
    assert re.search(r"\n  (next window|open now until) .* CET \(Europe/Berlin\)\n", out), out
    assert "warning: " in err and "schedule.window (30h)" in err
    assert err.rstrip().endswith("is valid, with 1 warning(s)")
    assert "error" not in err


def test_check_json_has_errors_warnings_and_policies(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = folder(tmp_path, {
        "policies.d/t.toml": '[[policy]]\nname = "t"\nmatch.names = ["te*"]\n'
                             'schedule.cron = "0 2 * * *"\n',
        "policies.d/u.toml": '[[policy]]\nname = "u"\nmatch.names = ["u*"]\n'
                             'schedule.cron = "0 2 * * *"\nidle.cpu_percent = 200\n',
    })  # fmt: skip

    status, out, _err = check(capsys, directory, "--json")

    report = json.loads(out)
    assert status == 2
    assert report["valid"] is False
    [error] = report["errors"]
    assert (error["file"], error["line"], error["policy"], error["field"], error["value"]) == (
        str(directory / "policies.d/u.toml"),
        5,
        "u",
        "idle.cpu_percent",
        "200",
    )
    assert "less than or equal to 100" in error["reason"]
    assert {w["field"] for w in report["warnings"]} == {None}
    assert len(report["warnings"]) == 2  # t: time zone unset, min_interval unset
    [t] = report["policies"]
    assert (t["name"], t["domains"], t["timezone"]) == ("t", ["test"], "UTC")
    assert t["next_window"]["start"].endswith("T02:00:00+00:00")
    assert t["next_window"]["end"].endswith("T06:00:00+00:00")


def test_without_libvirt_check_says_so_and_goes_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = '[[policy]]\nname = "t"\nmatch.names = ["*"]\nschedule.cron = "0 2 * * *"\n'
    directory = folder(tmp_path, {"policies.d/t.toml": text})
    status = main(["check", "--config-dir", str(directory), "--json",
                   "--connect", f"test://{tmp_path}/missing.xml"])  # fmt: skip
    out, err = capsys.readouterr()
    assert status == 0
    assert "cannot list domains" in err
    assert json.loads(out)["policies"][0]["domains"] is None


def test_an_empty_policy_folder_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = check(capsys, folder(tmp_path, {}))
    assert status == 0
    assert out == ""
    assert f"warning: {tmp_path / 'policies.d'}: no policy files (*.toml)" in err


def test_recover_and_history_run_despite_broken_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    directory = folder(tmp_path, {
        "virt-reclaim.toml": f'nice = 40\nstate_dir = "{state}"\nuri = "test:///default"\n',
        "policies.d/a.toml": BROKEN_POLICIES,
    })  # fmt: skip
    assert main(["history", "--config-dir", str(directory)]) == 0
    # In a process of its own: recover configures the logging of its process.
    recover = subprocess.run([sys.executable, "-m", "virt_reclaim", "recover", "--config-dir",
                              str(directory)], capture_output=True, text=True, timeout=60,
                             check=False)  # fmt: skip
    assert recover.returncode == 0, recover.stderr
    assert "going on with the valid ones" in recover.stderr
    assert (state / "journal.sqlite3").exists()
    assert "going on with the valid ones" in capsys.readouterr().err
    # A file that cannot be read gives no state folder: the option must say it.
    folder(tmp_path, {"virt-reclaim.toml": "state_dir = [\n"})
    assert main(["history", "--config-dir", str(directory)]) == 2
    assert "give --state-dir" in capsys.readouterr().err
    assert main(["history", "--config-dir", str(directory), "--state-dir", str(state)]) == 0


# --- schema -------------------------------------------------------------------------------


def schema(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["schema", *args]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


def values(schema_: dict[str, Any], node: dict[str, Any], path: str) -> list[tuple[str, Any]]:
    """Every (dotted path, value) the schema gives as a default or an example."""
    if "$ref" in node:
        node = {**schema_["$defs"][node["$ref"].split("/")[-1]], **node}
    found = []
    if "default" in node and path and node["default"] is not None:
        found.append((path, node["default"]))
    for option in [node, *node.get("anyOf", [])]:
        found += [(path, example) for example in option.get("examples", [])]
    for name, child in node.get("properties", {}).items():
        found += values(schema_, child, f"{path}.{name}" if path else name)
    return found


def toml(value: Any) -> str:
    """A JSON value as TOML (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()
                                if v is not None) + " }"  # fmt: skip
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


# Two selectors, so that setting either one to its default (nothing) still selects.
METADATA = {"namespace": "urn:x", "element": "reclaim"}
REQUIRED = {"name": "p", "match": {"names": ["*"], "metadata": METADATA},
            "schedule": {"cron": "0 2 * * *"}}  # fmt: skip


def lines(document: dict[str, Any], prefix: str = "") -> list[str]:
    """A document as TOML dotted keys, one line per value."""
    result = []
    for key, value in document.items():
        if isinstance(value, dict) and value:
            result += lines(value, f"{prefix}{key}.")
        elif value is not None:
            result.append(f"{prefix}{key} = {toml(value)}")
    return result


def with_value(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with the dotted ``path`` set to ``value``."""
    document = json.loads(json.dumps(base))
    *parents, last = path.split(".")
    node = document
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return dict(document)


def test_every_default_and_example_of_the_schemas_passes_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy_schema = schema(capsys)
    daemon_schema = schema(capsys, "--daemon")
    text = json.dumps([policy_schema, daemon_schema])
    assert "PT" not in text and '"format": "duration"' not in text
    policy_values = values(policy_schema, policy_schema["$defs"]["Policy"], "")
    daemon_values = values(daemon_schema, daemon_schema, "")
    assert len(policy_values) > 40 and len(daemon_values) > 10
    assert ("rewrite.min_gain", "64MiB") in policy_values
    assert ("schedule.window", "4h") in policy_values
    assert ("stats_interval", "1m") in daemon_values
    for number, (path, value) in enumerate(policy_values):
        document = "\n".join(["[[policy]]", *lines(with_value(REQUIRED, path, value))])
        where = folder(tmp_path / str(number), {"policies.d/p.toml": document})
        loaded = loading.load(str(where))
        assert loaded.errors == (), (path, value, [str(e) for e in loaded.errors])
        assert len(loaded.policies) == 1
    for number, (path, value) in enumerate(daemon_values):
        files = {"virt-reclaim.toml": "\n".join(lines(with_value({}, path, value))),
                 "policies.d/p.toml": "\n".join(["[[policy]]", *lines(REQUIRED)])}  # fmt: skip
        loaded = loading.load(str(folder(tmp_path / f"d{number}", files)))
        assert loaded.errors == (), (path, value, [str(e) for e in loaded.errors])
    # And once through the command itself, every policy default at once.
    defaults = {k: v for k, v in policy_values if "." not in k and isinstance(v, dict)}
    full = "\n".join(["[[policy]]", *lines({**REQUIRED, **defaults})])
    status, _out, err = check(capsys, folder(tmp_path / "all", {"policies.d/p.toml": full}))
    assert status == 0, err


def test_both_schemas_describe_every_field_and_validate_the_examples(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = Path(__file__).resolve().parents[3]
    for args in ((), ("--daemon",)):
        schema_ = schema(capsys, *args)
        for name, definition in [("", schema_), *schema_.get("$defs", {}).items()]:
            for field, spec in definition.get("properties", {}).items():
                assert spec.get("description"), f"{name}.{field} has no description"
    daemon = tomllib.loads((root / "config/virt-reclaim.toml").read_text())
    jsonschema.validate(daemon, schema(capsys, "--daemon"))
