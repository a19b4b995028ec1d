"""The `mpt-edge` command line: parses options, calls the training core, prints results.

One module per command group; each defines a Typer that this module mounts on `app`:

    options.py     the option types several commands share (--config, --backbone, --data, --out, ...)
    common.py      the error policy (`cli_errors`), task-name lists, the data folder, a checkpoint's backbone
    train.py       train teachers | source | target
    evaluate.py    eval
    quickstart.py  quickstart
    data.py        data fetch
    bundle.py      export, run, inspect (run and inspect: torch-free)
    peft.py        import-peft, export-peft
    serve.py       serve, serve-stop (Ray Serve, torch-free)

Command modules import only options and common (never each other, never this module); nothing imports torch
at module level, so `--help`, `run` and `inspect` start without it.
"""

from __future__ import annotations

import typer

from mpt_edge.cli import bundle, data, evaluate, peft, quickstart, serve, train

app = typer.Typer(help="Multitask Prompt Tuning on one frozen backbone.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
for group in (evaluate.eval_app, quickstart.quickstart_app, bundle.bundle_app, peft.peft_app, serve.serve_app):
    app.add_typer(group)   # no name: the group's commands become top-level commands
app.add_typer(train.train_app, name="train")
app.add_typer(data.data_app, name="data")


def main() -> None:  # pragma: no cover
    app()
