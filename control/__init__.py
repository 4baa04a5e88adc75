"""Runtime: CLI, configuration, and (in later issues) the bus, actors, supervisor and plant I/O."""
