"""``diffgen serve``'s HTTP API: the OpenAI wire format (:mod:`~diffgen.server.wire`) and the ASGI app
over one resident model (:mod:`~diffgen.server.app`). Imported only by the ``serve`` command, so
that ``diffgen --help`` never loads FastAPI."""
