"""Read models folded from the log (interactions + signals), committed with the positions read.

`store` (versioned SQLite tables, eventsourcing tracking), `context` and `cases` (the folds),
`runner` (follow, rebuild and switch over), `queries` (the read side, `as_of`).
"""
