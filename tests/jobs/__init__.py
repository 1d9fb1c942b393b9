"""Tests of the command line and batch jobs (`plugin/jobs/`)."""
