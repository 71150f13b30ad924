"""FastStream processors, each its own consumer group: validator (and more to come)."""
