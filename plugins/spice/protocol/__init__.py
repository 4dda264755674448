"""The sans-I/O SPICE layer of the SPICE plugin (link, ticket, framing, policy, guard)."""
