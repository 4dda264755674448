"""Domain XML fragments the built-in plugins merge into a domain (see broker.xml)."""
