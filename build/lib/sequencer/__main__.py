"""`python -m sequencer ...` (also under `torchrun -m sequencer ...`)."""

import sys

from sequencer.cli import main

sys.exit(main())
