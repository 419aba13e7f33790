"""DGL backend: kgrec's graphs as DGL graphs (``graph``) and DGL models (``rgcn``) under the
registry's contract (``spec``).

Only ``.venv-dgl`` (``make dgl-env``: dgl 2.1.0 on torch 2.2.1) can import ``graph`` and ``rgcn``.
This package's ``__init__`` and ``spec`` import no DGL, so the core registry can scan them.
"""

from kgrec.models.backends.dgl import spec as spec
