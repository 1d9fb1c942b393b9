"""Where results go: the `Store` interface, the embedded SQLite store and its
search, write-back of one response's results, and the catch-up sync that
finds responses whose results were never written.

May import `plugin.fhir`, `plugin.screening` and the leaf modules.
"""
