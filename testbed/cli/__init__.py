"""Command line (orchestration layer). ``asyncio.run`` lives only here."""
