"""Which patient a reference names: the one rule for every way a patient reference comes in.

A response, a `$populate` subject, a CDS Hooks context or prefetch and a
notification all name their patient by reference. Only two forms are
accepted: `Patient/{id}` and an absolute URL on the configured FHIR base
(`{base}/Patient/{id}`). Look-alikes (`x/Patient/V`, `Patient/V/_history/1`,
`Patient/V?foo`, another server's URL, `urn:uuid:`) are refused rather than
normalised: filed under `V`, a response about someone else would hide `V`'s
own results (its "no red flags" outcome over `V`'s emergency).
"""

from __future__ import annotations

import re

# FHIR R4 id (http://hl7.org/fhir/R4/datatypes.html#id), less `.` and `..`, which name no resource in a URL
ID = re.compile(r"(?!\.{1,2}$)[A-Za-z0-9\-.]{1,64}")
ACCEPTED_FORMS = "Patient/{id}, or an absolute URL on the configured FHIR server"


def valid_id(value: object) -> bool:
    """Whether `value` is a FHIR resource id that can be used in a URL (so not `.` or `..`)."""
    return isinstance(value, str) and ID.fullmatch(value) is not None


def patient_id(reference: object, fhir_base: str | None = None) -> str | None:
    """The Patient id a reference names, or None when it is not one of the accepted forms."""
    if not isinstance(reference, str):
        return None
    relative = reference
    base = (fhir_base or "").rstrip("/")
    if base and reference.startswith(base + "/"):
        relative = reference[len(base) + 1:]
    kind, slash, rest = relative.partition("/")
    return rest if kind == "Patient" and slash and valid_id(rest) else None


def patient_reference(reference: object, fhir_base: str | None = None) -> str | None:
    """The reference in its canonical relative form `Patient/{id}`, or None when it is not accepted."""
    found = patient_id(reference, fhir_base)
    return f"Patient/{found}" if found else None
