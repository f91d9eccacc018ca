"""The client of the chargpt inference service: ``client.api`` for Python
(``LanguageModelClient``), ``client.cli`` for ``chargpt generate``, ``score`` and ``health``.

It needs only ``chargpt`` (the wire contract, credential files, settings), never the server.
"""
