"""``python -m deqgen ...`` (and ``torchrun -m deqgen train ...``): the ``deqgen`` command line."""

from deqgen.cli import main

raise SystemExit(main())
