"""Request builders and response readers, one module per API (chat, embeddings, responses, batch).

Each module is pure: it turns settings and a call's arguments into a request body, and a decoded
answer into what the caller gets back. Sending, retrying, caching and accounting are one shared path
in :mod:`llmutils._clients`.
"""
