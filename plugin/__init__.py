"""Back-pain screening plugin: scores FHIR QuestionnaireResponses for axial SpA and red flags.

Sub-packages follow one response's way through the plugin; each imports only
packages to its right (tests/test_architecture.py checks it):

    jobs -> app -> ehr -> web -> stores -> fhir -> screening

`settings` and `observability` are leaf modules any package but `screening`
may import; `app` assembles the HTTP service from `web` and `ehr`.
"""

__version__ = "0.1.0"
