"""The online feature store on Redis: versioned records, async one-round-trip reads."""
