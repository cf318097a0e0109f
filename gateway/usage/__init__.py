"""Per-user token usage: read from the responses relayed, stored per UTC hour and model."""
