"""`python -m cram_ext.redundancy`: the command line of `cram_ext.redundancy.cli`."""
import sys

from .cli import main

sys.exit(main())
