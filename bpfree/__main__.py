import os
import sys

from bpfree.cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A data-parallel worker has torn its process group down and released its run folder by now; gloo's threads can
    # abort the interpreter's own teardown ("terminate called without an active exception"), which the launcher
    # would report as a dead rank. So a worker ends here, output flushed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
