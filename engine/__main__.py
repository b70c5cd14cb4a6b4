"""``python -m engine``: the Tradeoff Lab command line (see engine/cli/)."""
import sys

from .cli import main

if __name__ == "__main__":
    try:
        code = main()
    finally:
        # Workers would die with this process anyway; stopped politely, they exit normally
        # and end what they started (torch.compile's worker pool, whose semaphores would
        # otherwise be reported leaked).
        # A command that started none never imported the worker module: nothing to load then.
        if (worker := sys.modules.get("engine.worker")) is not None:
            worker.close_shared_workers()
    sys.exit(code)
