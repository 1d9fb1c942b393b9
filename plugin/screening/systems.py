"""Canonical URLs and code systems: the plugin's public FHIR vocabulary."""

BASE = "https://backpain-screen.org/fhir"

ITEMS = f"{BASE}/CodeSystem/screening-items"
ANSWERS = f"{BASE}/CodeSystem/screening-answers"
RESULTS = f"{BASE}/CodeSystem/screening-results"

# Identifier systems of what the plugin writes; values are deterministic UUIDs.
SID_OBSERVATION = f"{BASE}/sid/observation"
SID_TASK = f"{BASE}/sid/task"
SID_QR = f"{BASE}/sid/questionnaire-response"
SID_DEVICE = f"{BASE}/sid/device"
SID_PROVENANCE = f"{BASE}/sid/provenance"
RULE_SET_TAG = f"{BASE}/rule-set"
RULE_SET_POLICY = f"{BASE}/rules"

EXT_URGENCY = f"{BASE}/StructureDefinition/red-flag-urgency"

INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DATA_ABSENT = "http://terminology.hl7.org/CodeSystem/data-absent-reason"
OBS_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
PROVENANCE_TYPE = "http://terminology.hl7.org/CodeSystem/provenance-participant-type"
DATA_OPERATION = "http://terminology.hl7.org/CodeSystem/v3-DataOperation"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"

# Short names usable in mappings/ instead of full URLs.
ALIASES = {"screening-results": RESULTS, "screening-items": ITEMS, "screening-answers": ANSWERS}
