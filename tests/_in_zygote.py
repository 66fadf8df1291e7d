"""Is this module being imported by the zygote itself (to make a spare), not
by the test process or a spare? For test worker modules that act slow there
only (test_priority)."""

from __future__ import annotations

import sys


def in_the_zygote() -> bool:
    main = sys.modules.get("__main__")
    serve = sys.modules.get("worker._serve")
    # a spare runs the zygote's code too, but has waited (worker._serve.while_waiting)
    return hasattr(main, "_fork_spare") and not getattr(serve, "_waited", False)
