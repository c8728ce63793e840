import sys

from conslu.cli import main

sys.exit(main())
