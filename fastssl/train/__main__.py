import sys

from fastssl.train.cli import main

sys.exit(main())
