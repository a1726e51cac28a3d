"""The subcommands' command lines: one module per `sequencer` subcommand, named after it.

Each module holds the subcommand's description (its docstring) and its flags (`add_arguments`, built from the
config dataclasses of `sequencer.config` and, for train, `sequencer.train_config.TrainConfig`, where the library reads
the same defaults); the names those flags offer live in `sequencer.choices`. They import nothing but argparse and
those torch-free modules (`sequencer.options` too), so that building any parser (`sequencer train --help`
included) costs no torch import; the work itself lives in the module `sequencer.cli.COMMANDS` names, imported when
the command runs.
"""
