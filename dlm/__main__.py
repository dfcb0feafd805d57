import sys

from dlm.cli.main import main

sys.exit(main())
