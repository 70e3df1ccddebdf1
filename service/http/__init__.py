"""The server's HTTP side: one aiohttp listener on the server's event loop that other modules add routes to."""
