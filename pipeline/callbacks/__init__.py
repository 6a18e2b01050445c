"""Publisher callbacks: durable, signed, isolated, SSRF-safe delivery.

Pure parts: `task` (conversion -> pending callback, macro values), `request`
(URL, JSON body, headers, signature, URL redaction), `policy` (what a response
means, what happens next), `ssrf` (which addresses are allowed), `offsets`
(what may be committed), `lanes` (per-publisher bookkeeping). I/O: `deliver`
(aiohttp), `attempts` (lane workers: request, outcome), `outbox` (outcome
records to Kafka in batches), `service` (Kafka wiring, read it first), `replay`
(dead letters back into the schedule).
"""
