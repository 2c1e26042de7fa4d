"""`python -m heterorl.server` (what `torchrun ... -m heterorl.server` runs on every rank): the learner."""

import sys

from heterorl.server.main import main

sys.exit(main())
