"""Tests of the FHIR client, its SMART tokens and the FHIR test server (`plugin/fhir/`)."""
