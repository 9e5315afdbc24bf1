"""``python -m brpg`` is the same as the ``brpg`` command."""

from brpg.cli import main

raise SystemExit(main())
