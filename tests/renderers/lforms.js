// NLM LHC-Forms in the portal page: its web component renders the Questionnaire; getFormFHIRData gives the
// QuestionnaireResponse (null when an answer is invalid, e.g. 28.5 in an integer field).
import {portal} from "./portal.js";

async function loaded() {
  // main.js and lformsFHIR.min.js fill in window.LForms as they load: nothing to wait on but the globals.
  while (!(window.LForms?.Util?.addFormToPage && window.LForms.Util.getFormFHIRData)) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

portal({
  name: "LHC-Forms",
  async show(questionnaire, element, plugin, patient) {
    await loaded();
    // The SDC launch context: the Patient itself, as a portal that has it would pass it (no FHIR server asked).
    window.LForms.Util.setFHIRContext(null, {patient});
    await window.LForms.Util.addFormToPage(questionnaire, element, {prepopulate: true});
  },
  response: () => window.LForms.Util.getFormFHIRData("QuestionnaireResponse", "R4"),
});
