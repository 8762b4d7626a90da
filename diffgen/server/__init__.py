"""``diffgen serve``'s HTTP API: the OpenAI wire format (:mod:`~diffgen.server.wire`,
:mod:`~diffgen.server.answers`), the routes (:mod:`~diffgen.server.app`), the serving over one
resident model (:mod:`~diffgen.server.engine`) and the way back (:mod:`~diffgen.server.streaming`).
Imported only by the ``serve`` command, so that ``diffgen --help`` never loads FastAPI."""
