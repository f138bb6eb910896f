"""``python -m audit``: see audit.cli."""

from .cli import main

raise SystemExit(main())
