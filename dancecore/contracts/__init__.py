"""The contracts between components and the core: the protocols (``Policy``, ``Sampler``, ``Reward``,
``Algorithm``), the frozen records that flow between them, and the component config base.

May import: :mod:`dancecore.functional` and :mod:`dancecore.errors`. Nothing here does I/O.
"""
