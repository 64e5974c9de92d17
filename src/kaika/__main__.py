import sys

from kaika.cli import main

sys.exit(main())
