import sys

from vlmtag.cli import main

sys.exit(main())
