"""Training algorithms: one file each, loop visible top to bottom."""
