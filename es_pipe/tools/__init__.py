"""The ``es-pipe`` command line, outside the library: :mod:`~es_pipe.tools.cli` (``main``),
one module per command (:mod:`~es_pipe.tools.shard`, :mod:`~es_pipe.tools.index`,
:mod:`~es_pipe.tools.inspect_manifests`) and their argparse types. The library never
imports this package (``tests/test_layout.py`` checks it)."""
