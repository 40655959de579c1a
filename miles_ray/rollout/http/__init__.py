"""Over HTTP: our engine server (SGLang-compatible API, strict mode), its guards and request
bodies, the router, the client-side engine (:class:`.engine.HttpEngine`) and the launcher."""
