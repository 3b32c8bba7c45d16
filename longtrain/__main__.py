import sys

from longtrain.launch.cli import main

sys.exit(main())
