"""A policy's hooks: commands run before its job shuts a guest down, and after the job ends.

Each is an argv list, run without a shell (``job.hooks`` runs them); the policy's
``[policy.hooks]`` table. A plain string is refused rather than split: the
operator's quoting would be guessed, and a shell would read the domain's name.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator

from virt_reclaim.config.fields import Duration, Model
from virt_reclaim.job.settings import JobHooks

_DEFAULTS = JobHooks()


def parse_argv(value: Any) -> Any:  # noqa: ANN401 - pydantic passes any input
    """An argv list: the program (an absolute path or a name found in PATH) and its arguments."""
    if isinstance(value, str):
        raise ValueError(
            f'a list of strings, the program and its arguments (no shell): ["{value}"] or '
            '["/etc/virt-reclaim/hooks/notify", "--flag"], not a string'
        )
    if not isinstance(value, list | tuple):
        return value  # pydantic names the type it wanted
    if not value:
        raise ValueError("an empty list: give the program and its arguments, or leave it unset")
    if not all(isinstance(part, str) for part in value):
        raise ValueError('every element is a string (a number is written in quotes: "60")')
    program = value[0]
    if not program or (not program.startswith("/") and "/" in program):
        raise ValueError(
            f"program {program!r}: an absolute path or a bare name found in PATH "
            "(a relative path would depend on the daemon's working folder)"
        )
    return tuple(value)


Argv = Annotated[
    tuple[str, ...],
    BeforeValidator(parse_argv),
    WithJsonSchema({"type": "array", "items": {"type": "string"}, "minItems": 1}),
]


class Hooks(Model):
    """Commands run around a job (no shell; each gets the job's VIRT_RECLAIM_* variables)."""

    before_shutdown: Argv | None = Field(
        default=None,
        description="run when an offline job is about to shut a running guest down (after the "
        "read-only steps and the free-space step found work); a non-zero exit or a timeout "
        "skips the guest, left running and untouched",
        examples=[["/etc/virt-reclaim/hooks/silence", "create"]],
    )
    after_job: Argv | None = Field(
        default=None,
        description="run once when a job that ran the before_shutdown hook or went past its "
        "read-only steps ends, whatever its outcome; a failure is logged, the outcome stands",
        examples=[["/etc/virt-reclaim/hooks/silence", "expire"]],
    )
    timeout: Duration = Field(
        default=timedelta(seconds=_DEFAULTS.timeout_s),
        description="each hook run that lasts longer is killed (with every process it "
        "started); a before_shutdown hook killed so skips the guest",
        examples=["30s", "2m"],
    )

    @field_validator("timeout")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("a positive duration, like 30s or 2m")
        return value

    def job_hooks(self) -> JobHooks:
        """The hooks as a job carries them."""
        return JobHooks(
            before_shutdown=self.before_shutdown or (),
            after_job=self.after_job or (),
            timeout_s=self.timeout.total_seconds(),
        )
