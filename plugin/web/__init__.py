"""The HTTP service's own parts: the FHIR endpoints, the patient form and the
clinician's results pages, request security, signed access links, the
running service's state and its OpenAPI description; templates and static files.

May import `plugin.stores`, `plugin.fhir`, `plugin.screening` and the leaf modules.
"""
