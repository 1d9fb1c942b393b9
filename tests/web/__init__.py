"""Tests of the HTTP service and its pages (`plugin/web/`)."""
