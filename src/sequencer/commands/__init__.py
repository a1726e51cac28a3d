"""The subcommands' command lines: one module per `sequencer` subcommand, named after it.

Each module holds the subcommand's description (its docstring) and its flags (`add_arguments`; train's live in
`sequencer.train_options`, where the library reads their defaults); the names and defaults those flags offer live in
`sequencer.choices`, where the modules doing the work read them too. They import nothing but argparse and those
torch-free modules (`sequencer.options` too), so that building any parser (`sequencer train --help` included) costs no
torch import; the work itself lives in the module `sequencer.cli.COMMANDS` names, imported when the command runs.
"""
