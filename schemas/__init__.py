"""The Avro schemas of every topic, with example messages; installed as `pipeline.schemas`."""
