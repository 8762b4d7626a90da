"""Clients of OpenAI-compatible servers (``run --server``, ``batch --server``): :mod:`.client`
speaks HTTP and server-sent events, :mod:`.requests` turns diffgen's prompts and flags into
request bodies and answers into the records local runs write."""
