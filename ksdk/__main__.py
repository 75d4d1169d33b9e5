"""``python -m ksdk``: the same as the ``ksdk`` command."""

from ksdk.cli import main

raise SystemExit(main())
