"""Back-pain screening plugin: scores FHIR QuestionnaireResponses for axial SpA and red flags."""

__version__ = "0.1.0"
