import sys

from prune_trainer.cli import main

sys.exit(main())
