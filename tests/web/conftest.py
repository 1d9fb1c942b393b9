"""The browser tests' fixtures (tests/web/browser.py): the running service, Chromium, axe-core, a visit."""

from tests.web.browser import axe_script, browser, playwright, served, visit  # noqa: F401
