"""Real task data fetched from registry packages (see `mpt_edge.data.fetch`)."""
