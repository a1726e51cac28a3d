"""The subcommands' command lines: one module per `sequencer` subcommand, named after it.

Each module holds the subcommand's description (its docstring) and its flags (`add_arguments`); the names and
defaults those flags offer live in `sequencer.choices`, where the modules doing the work read them too. They import
nothing but argparse, `sequencer.options` and `sequencer.choices`, so that building any parser (`sequencer train
--help` included) costs no torch import; the work itself lives in the module `sequencer.cli.COMMANDS` names, imported
when the command runs.
"""
