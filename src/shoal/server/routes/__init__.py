"""Native REST routes; each parses, calls one engine action, returns."""
