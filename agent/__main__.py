"""`python -m agent` is `python -m agent.decap`."""

import sys

from agent.decap import main

sys.exit(main())
