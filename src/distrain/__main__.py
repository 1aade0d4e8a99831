import sys

from distrain.commands.cli import main

sys.exit(main())
