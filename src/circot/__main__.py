import sys

from circot.cli import main

sys.exit(main())
