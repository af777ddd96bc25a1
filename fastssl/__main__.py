import sys

from fastssl.cli import main

sys.exit(main())
