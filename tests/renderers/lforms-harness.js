// A portal page that shows the plugin's Questionnaire in NLM LHC-Forms and sends what LHC-Forms makes of the
// answers to the plugin, as a portal would. Query: ?plugin=<base URL>&questionnaire=<id>&patient=Patient/<id>.
// After "Send", window.sent holds {status, location, qr, reply}; #state says "ready", "sent" or "failed: …".
const query = new URLSearchParams(location.search);
const plugin = query.get("plugin");
const state = document.getElementById("state");
const FHIR_JSON = "application/fhir+json";

async function lformsLoaded() {
  // main.js and lformsFHIR.min.js fill in window.LForms as they load; nothing to wait on but the globals.
  while (!(window.LForms?.Util?.addFormToPage && window.LForms.Util.getFormFHIRData)) {
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

async function show() {
  const answer = await fetch(`${plugin}/Questionnaire/${query.get("questionnaire")}`, {headers: {Accept: FHIR_JSON}});
  if (!answer.ok) throw new Error(`GET Questionnaire: ${answer.status}`);
  const questionnaire = await answer.json();
  await lformsLoaded();
  await window.LForms.Util.addFormToPage(questionnaire, "form", {});
  state.textContent = "ready";
}

async function send() {
  const qr = window.LForms.Util.getFormFHIRData("QuestionnaireResponse", "R4");
  if (!qr) throw new Error("LHC-Forms made no QuestionnaireResponse of these answers");  // e.g. 28.5 as an integer
  qr.subject = {reference: query.get("patient")};
  const answer = await fetch(`${plugin}/QuestionnaireResponse`, {
    method: "POST", body: JSON.stringify(qr), headers: {"Content-Type": FHIR_JSON, Accept: FHIR_JSON}});
  window.sent = {status: answer.status, location: answer.headers.get("Location"), qr, reply: await answer.json()};
  document.getElementById("sent").textContent = JSON.stringify(window.sent.reply, null, 1);
  state.textContent = "sent";
}

function failed(error) {
  state.textContent = `failed: ${error}`;
}

document.getElementById("send").addEventListener("click", () => send().catch(failed));
show().catch(failed);
