"""Publisher callbacks: durable, signed, isolated, SSRF-safe delivery.

Pure parts: `task` (conversion -> pending callback, macro values), `request`
(URL, JSON body, headers, signature, URL redaction), `policy` (what a response
means, what happens next), `ssrf` (which addresses are allowed), `offsets`
(what may be committed). I/O: `deliver` (aiohttp), `service` (Kafka wiring,
read it first), `replay` (dead letters back into the schedule).
"""
