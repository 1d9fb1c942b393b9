"""Tests of the stores, write-back and sync (`plugin/stores/`)."""
