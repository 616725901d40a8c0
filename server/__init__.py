"""The aiohttp server: REST API (Rockset's shapes), API-key auth, the catalog of integrations
and collections, and the `shoal` command line."""
