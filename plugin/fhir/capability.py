"""The service's CapabilityStatement (`GET /metadata`): only what the service really does.

The Subscription endpoint `PUT /QuestionnaireResponse/{id}` is not a FHIR
update (nothing is stored under that id: the response's results are written
to the store), so it is not declared as `update`; the resource's
documentation names it, and `rest.security` says which calls need what.
"""

from __future__ import annotations

from plugin import __version__
from plugin.screening.systems import BASE

DEFINITION_SEARCH = [{"name": "url", "type": "uri"}, {"name": "version", "type": "token"},
                     {"name": "_id", "type": "token"}]
DEFINITION_TYPES = ("Questionnaire", "CodeSystem", "StructureDefinition", "OperationDefinition")
SDC = "http://hl7.org/fhir/uv/sdc/OperationDefinition"
NOTIFICATIONS = ("`PUT /QuestionnaireResponse/{id}` (or `/notify/QuestionnaireResponse/{id}`) takes rest-hook "
                 "Subscription notifications with a payload, and `POST /notify` those without: they need the "
                 "`X-Notification-Secret` header and score a response the FHIR server already holds; they are "
                 "not a FHIR update.")
SECURITY = ("Creating and reading responses, `$populate`, the instance `$extract` and the results need "
            "`Authorization: Bearer` with the ingest token when one is configured; Subscription notifications need "
            "`X-Notification-Secret`; CDS Hooks calls need a signed JWT from a configured CDS Client. Definitions "
            "and this statement are open.")


def capability_statement(base_url: str) -> dict:
    definitions = [{"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": DEFINITION_SEARCH} for t in DEFINITION_TYPES]
    definitions[0]["operation"] = [{"name": "populate", "definition": f"{SDC}/Questionnaire-populate"}]
    response = {
        "type": "QuestionnaireResponse",
        "documentation": NOTIFICATIONS,
        "interaction": [{"code": "create", "documentation": "Scores the response and writes it with its results "
                                                             "in one transaction."},
                        {"code": "read"}, {"code": "vread"}],
        "operation": [{"name": "extract", "definition": f"{BASE}/OperationDefinition/QuestionnaireResponse-extract"}],
    }
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-12-03",
        "kind": "instance",
        "software": {"name": "backpain-screen", "version": __version__},
        "implementation": {"description": "Back-pain screening for axial spondyloarthritis and red flags",
                           "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml"],
        "rest": [{"mode": "server", "security": {"description": SECURITY},
                  "resource": [*definitions, response]}],
    }
