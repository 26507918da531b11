"""Instances on this host: the private state dir, typed records, and the logic of
`status`, `stop` and `cleanup` (returns data, prints nothing)."""
