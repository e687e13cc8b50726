"""Everything that knows about process groups: checkpoints now, expert parallelism next."""
