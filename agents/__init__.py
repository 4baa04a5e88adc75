"""Agent logic: transport-free message handlers, protocol messages and policies."""
