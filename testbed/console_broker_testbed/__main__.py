"""``python -m console_broker_testbed``: bring a guest up or down (scripts/demo)."""

import sys

from console_broker_testbed import main

sys.exit(main())
