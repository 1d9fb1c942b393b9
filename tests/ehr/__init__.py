"""Tests of EHR integration (`plugin/ehr/`)."""
