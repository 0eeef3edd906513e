"""The base every layer builds on: the config schema, records and their digests, cache keys, sealed
artifacts, errors, redaction, the runtime and hardware facts. Imports nothing else of dpoflow."""
