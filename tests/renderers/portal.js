// What a patient portal does around a FHIR form renderer: fetch the plugin's Questionnaire, hand it to the
// renderer, and on "Send" POST the QuestionnaireResponse the renderer made of the answers to the plugin.
// Query: ?plugin=<base URL>&questionnaire=<id>&patient=Patient/<id>[&birthDate=YYYY-MM-DD]. #state says "loading", "ready", "sent" or
// "failed: …"; after "sent", window.sent holds {status, location, qr, reply}.
const FHIR_JSON = "application/fhir+json";

export async function portal(renderer) {
  const query = new URLSearchParams(location.search);
  const plugin = query.get("plugin");
  const state = document.getElementById("state");
  const failed = (error) => { state.textContent = `failed: ${error.message ?? error}`; };

  async function show() {
    const answer = await fetch(`${plugin}/Questionnaire/${query.get("questionnaire")}`, {headers: {Accept: FHIR_JSON}});
    if (!answer.ok) throw new Error(`GET Questionnaire: ${answer.status}`);
    const questionnaire = await answer.json();
    // The patient as the portal knows them; a birthDate given lets the renderer prefill the age (SDC).
    const patient = {resourceType: "Patient", id: query.get("patient").split("/").pop()};
    if (query.get("birthDate")) patient.birthDate = query.get("birthDate");
    await renderer.show(questionnaire, document.getElementById("form"), plugin, patient);
    state.textContent = "ready";
    return questionnaire;
  }

  async function send(questionnaire) {
    state.textContent = "sending";
    const qr = await renderer.response(questionnaire);
    if (!qr) throw new Error(`${renderer.name} made no QuestionnaireResponse of these answers`);
    qr.subject = {reference: query.get("patient")};
    const answer = await fetch(`${plugin}/QuestionnaireResponse`, {
      method: "POST", body: JSON.stringify(qr), headers: {"Content-Type": FHIR_JSON, Accept: FHIR_JSON}});
    window.sent = {status: answer.status, location: answer.headers.get("Location"), qr, reply: await answer.json()};
    state.textContent = "sent";
  }

  try {
    const questionnaire = await show();
    document.getElementById("send").addEventListener("click", () => send(questionnaire).catch(failed));
  } catch (error) {
    failed(error);
  }
}
