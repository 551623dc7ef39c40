import sys

from bpfree.cli import main

sys.exit(main())
