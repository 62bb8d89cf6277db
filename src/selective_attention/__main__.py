import sys

from selective_attention.cli import main

sys.exit(main())
