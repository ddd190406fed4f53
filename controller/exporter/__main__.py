"""`python -m controller.exporter --config FILE`: the exporter beside one LB or agent."""

import sys

from controller.exporter.exporter import main

sys.exit(main())
