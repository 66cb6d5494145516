"""``python -m es_pipe.tools``: the ``es-pipe`` command."""

from es_pipe.tools.cli import main

raise SystemExit(main())
