"""The ``crossent`` command: a click group whose subcommands are imported on demand.

``crossent score`` must stay light (no torch, scikit-learn, pandas or matplotlib unless it
draws a report), so the group imports a subcommand's module only when that subcommand runs
or its help is asked for.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["main"]

# subcommand -> "module:attribute" of its click.Command
_SUBCOMMANDS = {
    "score": "crossent.cli.score:score",
    "demo": "crossent.cli.demo:demo",
    "bench": "crossent.cli.bench:bench",
}


class LazyGroup(click.Group):
    """A click.Group that imports each subcommand's module when the subcommand is needed."""

    def __init__(self, *args, lazy_subcommands=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = dict(lazy_subcommands or {})

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.lazy_subcommands:
            return self._load(cmd_name)
        return super().get_command(ctx, cmd_name)

    def _load(self, cmd_name):
        module_name, attr = self.lazy_subcommands[cmd_name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # the module exists but one of its imports does not
                raise
            return None  # not installed in this tree: click reports "No such command"
        command = getattr(module, attr, None)
        if not isinstance(command, click.Command):
            raise TypeError(
                f"{module_name}.{attr} must be a click.Command, got {type(command).__name__}"
            )
        return command


@click.group(cls=LazyGroup, lazy_subcommands=_SUBCOMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="crossent")
def main():
    """crossent: cross-entropy done properly.

    \b
    crossent score PATH --target y --probs 'p_*'     evaluate a file of predictions
    crossent demo                                     train a digits classifier with crossent
    crossent bench ce --rows 200000 --classes 1000    check, then time, against the peers here
    """


if __name__ == "__main__":
    main()
