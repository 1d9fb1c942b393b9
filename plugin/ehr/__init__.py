"""EHR integration, built on the web service's plumbing: CDS Hooks (service,
cards, JWT checks), SMART App Launch, Subscriptions and `$populate`.

May import `plugin.web`, `plugin.stores`, `plugin.fhir`, `plugin.screening`
and the leaf modules.
"""
