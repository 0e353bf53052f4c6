"""``python -m parity``: see :mod:`parity.cli`."""

from .cli import main

raise SystemExit(main())
