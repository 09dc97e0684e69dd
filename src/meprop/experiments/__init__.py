"""meprop's experiments: the paper's tasks, the trainer that runs them, and what reports them.

The library (``meprop``: configs, layers, ops, kernels, conversion, meSimp, meAct, checkpoints,
distributed pieces) knows nothing of this package; this package uses the library as any user
would, through ``meprop``'s modules. ``tests/test_imports.py`` holds both to that.

* ``train``: ``TrainConfig`` and the ``Trainer`` (``run``), with ``parts`` (what a run adds to
  the loop: DDP, meSimp, meAct, the k log, clocks) and ``timing``.
* ``tasks``: MNIST, POS tagging, dependency parsing, the character LM; ``data``: their files.
* ``grids``, ``reproduce``, ``tta``: the grids behind the paper's tables and the
  time-to-accuracy judge; ``report``, ``meact_report``, ``stats``, ``plots``: their reports.
* ``cli`` (the ``meprop`` command), ``demo``, ``launch`` (multi-process runs), ``info``,
  ``progress``.
"""
