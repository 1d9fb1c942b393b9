"""Talking FHIR to others: formats over HTTP (JSON and XML replies), the
CapabilityStatement, the async FHIR REST client and its SMART Backend
Services tokens.

May import `plugin.screening`, `plugin.settings` and `plugin.observability`.
"""
