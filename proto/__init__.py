"""The gradwatch wire contract (``gradwatch.v1``), shared by agent and collector.

``proto/gradwatch/v1/*.proto`` is the source of truth; the modules in ``v1/``
are generated from it by ``python -m gradwatch.proto.generate`` and committed.
"""
