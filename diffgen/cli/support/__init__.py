"""What the commands share, apart from the commands themselves (``diffgen/cli/<command>.py``).

The options and their typed groups (:mod:`.options`, :mod:`.option_groups`), the one error funnel
(:mod:`.funnel`), the config file (:mod:`.config`), loading with a plan line, inputs and outputs
(:mod:`.common`), the recipe of a local generation (:mod:`.job`), where ``run`` and ``batch``
generate, here or on a server (:mod:`.run_backends`, :mod:`.batch_backends`, :mod:`.batch_runner`),
and the chat's read-eval-print loop and server client (:mod:`.chat_repl`, :mod:`.chat_client`).
"""
