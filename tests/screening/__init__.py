"""Tests of the screening core (`plugin/screening/`)."""
