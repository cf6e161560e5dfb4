"""Version rules and JSON Schema validation of trace metadata.

A reader of format ``M.m`` opens any ``M.x``: an older or equal minor silently, a newer minor
with a warning (unknown keys are ignored, per the spec's additive-minor rule). A different
major is refused with both versions named. The schema files ship inside the package
(``tracekit.schemas``), copied from the repository's ``schemas/`` folder.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import jsonschema

from .errors import MetadataError, VersionError
from .format import FORMAT_VERSION, FORMAT_VERSION_STR, SCHEMA_NAME, parse_version


def schema_path(major: int = FORMAT_VERSION[0], minor: int = FORMAT_VERSION[1]):
    """The installed JSON Schema file for a format version (an importlib Traversable)."""
    return resources.files("tracekit.schemas") / f"trace-v{major}.{minor}.schema.json"


def spec_path(major: int = FORMAT_VERSION[0], minor: int = FORMAT_VERSION[1]):
    """The installed prose spec for a format version."""
    return resources.files("tracekit.schemas") / f"trace-v{major}.{minor}.md"


@functools.cache
def load_schema(major: int = FORMAT_VERSION[0], minor: int = FORMAT_VERSION[1]) -> dict[str, Any]:
    return json.loads(schema_path(major, minor).read_text(encoding="utf-8"))


def schema_errors(meta: dict[str, Any], *, allow_unknown_keys: bool = False) -> list[str]:
    """Every way ``meta`` breaks the current schema, one readable line each."""
    validator = jsonschema.Draft202012Validator(load_schema())
    problems = []
    for err in sorted(validator.iter_errors(meta), key=lambda e: list(e.absolute_path)):
        if allow_unknown_keys and err.validator == "additionalProperties":
            continue
        where = "/".join(str(p) for p in err.absolute_path) or "(root)"
        problems.append(f"metadata {where}: {err.message}")
    return problems


def check_metadata(meta: dict[str, Any]) -> tuple[tuple[int, int], bool]:
    """Apply the version rules and the schema; returns (version, newer_minor).

    Raises VersionError for another major version and MetadataError for anything that does not
    follow the schema (never guessing that a file is some other version)."""
    if meta.get("schema") != SCHEMA_NAME:
        raise MetadataError(f"metadata 'schema' is {meta.get('schema')!r}, expected "
                            f"{SCHEMA_NAME!r}")
    version = parse_version(meta.get("version"))
    if version[0] != FORMAT_VERSION[0]:
        raise VersionError(
            f"trace format version {version[0]}.{version[1]} is not supported by this reader "
            f"(format {FORMAT_VERSION_STR}); "
            + ("upgrade tracekit" if version[0] > FORMAT_VERSION[0] else "convert it first"))
    newer_minor = version[1] > FORMAT_VERSION[1]
    problems = schema_errors(meta, allow_unknown_keys=newer_minor)
    if problems:
        raise MetadataError(problems[0] + (f" (+{len(problems) - 1} more)"
                                           if len(problems) > 1 else ""))
    return version, newer_minor
