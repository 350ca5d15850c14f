"""Pure data: topology, scenario, device catalog, model profiles, plans. No I/O beyond reading files."""
