"""SGLang: its request rules (:mod:`.api`, derived from SGLang's source and cited), the HTTP
client that speaks them to any SGLang-compatible server (:mod:`.client`), launch flags
(:mod:`.backend`). SGLang itself is never imported here."""
