"""The service's CapabilityStatement (`GET /metadata`)."""

from __future__ import annotations

from plugin import __version__

DEFINITION_SEARCH = [{"name": "url", "type": "uri"}, {"name": "version", "type": "token"},
                     {"name": "_id", "type": "token"}]


def capability_statement(base_url: str) -> dict:
    definitions = [{"type": t, "interaction": [{"code": "read"}, {"code": "search-type"}],
                    "searchParam": DEFINITION_SEARCH} for t in ("Questionnaire", "CodeSystem")]
    definitions[0]["operation"] = [{"name": "populate", "definition": "http://hl7.org/fhir/uv/sdc/"
                                                                      "OperationDefinition/Questionnaire-populate"}]
    response = {
        "type": "QuestionnaireResponse",
        "interaction": [{"code": "create"}, {"code": "update",
                                             "documentation": "Subscription notifications (rest-hook with payload)"}],
        "operation": [{"name": "extract", "definition": "http://hl7.org/fhir/uv/sdc/OperationDefinition/"
                                                        "QuestionnaireResponse-extract"}],
    }
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-21",
        "kind": "instance",
        "software": {"name": "backpain-screen", "version": __version__},
        "implementation": {"description": "Back-pain screening for axial spondyloarthritis and red flags",
                           "url": base_url},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "application/fhir+xml"],
        "rest": [{"mode": "server", "resource": [*definitions, response]}],
    }
