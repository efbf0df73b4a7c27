"""moe2's OpenAI-compatible HTTP gateway: one more phone, with many users.

``moe2 gateway`` turns ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/models`` into
phone requests on the broker through one MQTT connection (:mod:`.upstream` is the reference
phone client asking on behalf of one client id per API key). What a request becomes and what
a reply looks like to an OpenAI client are pure functions (:mod:`.openai_api`); keys
(:mod:`.keys`), the ASGI app (:mod:`.app`), metrics (:mod:`.metrics`) and the daemon
(:mod:`.service`) wrap them. The runtime (agent, coordinator, shared) never imports this package.
"""
