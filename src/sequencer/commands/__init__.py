"""The subcommands' command lines: one module per `sequencer` subcommand, named after it.

Each module holds the subcommand's description (its docstring), its flags (`add_arguments`) and the names and
defaults those flags offer (train's live in `sequencer.train_options`, where the library reads them too). They import
nothing but argparse and those torch-free option modules, so that building any parser (`sequencer train --help`
included) costs no torch import; the work itself lives in the module `sequencer.cli.COMMANDS` names, imported when the
command runs.
"""
