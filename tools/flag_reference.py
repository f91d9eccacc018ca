"""Writes docs/reference.md: every `chargpt` command's `--help`, from the real click parsers.

python -m tools.flag_reference > docs/reference.md
"""

from __future__ import annotations

import sys

import click

from chargpt.cli import cli as chargpt_cli

HEADER = """# Command reference

Generated from the commands' own `--help` by `python -m tools.flag_reference > docs/reference.md`;
`tests/test_docs.py` fails when this file and `--help` disagree. Every `chargpt train` flag is
also a `CHARGPT_<NAME>` environment variable.
"""


def _help(
    command: click.Command, path: list[str], parent: click.Context | None
) -> tuple[str, click.Context]:
    """A command's help text at a fixed width (the same on every terminal), and its context."""
    # The command's own context settings (e.g. -h as well as --help), as a real invocation
    # would have: click caches the help option it first makes, so help must not depend on
    # whether the command already ran in this process.
    settings = {"terminal_width": 100, "max_content_width": 100, **command.context_settings}
    ctx = click.Context(command, info_name=path[-1], parent=parent, **settings)
    return command.get_help(ctx), ctx


def render() -> str:
    """The reference as Markdown: one section per command, its help text verbatim."""
    parts = [HEADER]

    def walk(command: click.Command, path: list[str], parent: click.Context | None) -> None:
        text, ctx = _help(command, path, parent)
        parts.append(f"\n## `{' '.join(path)}`\n\n```text\n{text.rstrip()}\n```\n")
        if isinstance(command, click.Group):
            for name in sorted(command.list_commands(ctx)):
                sub = command.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(chargpt_cli, ["chargpt"], None)
    return "".join(parts)


if __name__ == "__main__":
    sys.stdout.write(render())
