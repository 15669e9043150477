"""`python -m neuroprune.cli ...` (what `torchrun -m` and `accelerate launch -m` need)."""

import sys

from neuroprune.cli.main import main

sys.exit(main())
