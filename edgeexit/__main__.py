import sys

from edgeexit.cli import main

sys.exit(main())
