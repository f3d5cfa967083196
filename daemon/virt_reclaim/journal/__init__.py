"""The job journal: its store (schema, writes, reservations), queries, records and recovery."""
