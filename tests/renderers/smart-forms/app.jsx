// CSIRO's Smart Forms renderer in the portal page: a minimal React app with the library's own pieces
// (buildForm, BaseRenderer in its theme and query client, getResponse), as its documentation shows.
import React, {useEffect, useState} from "react";
import {createRoot} from "react-dom/client";
import {QueryClientProvider} from "@tanstack/react-query";
import {
  BaseRenderer, RendererThemeProvider, buildForm, getResponse, removeEmptyAnswersFromResponse,
  useRendererQueryClient,
} from "@aehrc/smart-forms-renderer";
import {populateQuestionnaire} from "@aehrc/sdc-populate";
import {portal} from "../portal.js";

// SDC prefill the Smart Forms way: its sdc-populate evaluates the initialExpressions with the patient as %patient
// (nothing is fetched: the Questionnaire asks only for the launch context).
async function prefilled(questionnaire, patient, sourceServerUrl) {
  const {populateSuccess, populateResult} = await populateQuestionnaire({
    questionnaire, patient,
    fetchResourceCallback: (query) => Promise.reject(new Error(`not fetched: ${query}`)),
    fetchResourceRequestConfig: {sourceServerUrl},
  });
  return populateSuccess ? populateResult.populatedResponse : undefined;
}

function Form({questionnaire, terminologyServerUrl, patient, onShown}) {
  const queryClient = useRendererQueryClient();
  const [built, setBuilt] = useState(false);
  useEffect(() => {
    // The plugin as terminology server: the answers are all answerOption, so nothing should be asked of it,
    // and without one the renderer would fall back to a public server on another host.
    prefilled(questionnaire, patient, terminologyServerUrl)
      .then((questionnaireResponse) => buildForm({questionnaire, questionnaireResponse, terminologyServerUrl}))
      .then(() => setBuilt(true));
  }, [questionnaire, terminologyServerUrl, patient]);
  useEffect(() => { if (built) onShown(); }, [built, onShown]);
  if (!built) return <p>Loading the form…</p>;
  return (
    <RendererThemeProvider>
      <QueryClientProvider client={queryClient}>
        <BaseRenderer/>
      </QueryClientProvider>
    </RendererThemeProvider>
  );
}

// The renderer's own response, hidden answers and all: the test shows why the portal must not send it as it is.
window.rawResponse = () => getResponse();

portal({
  name: "Smart Forms",
  show: (questionnaire, element, plugin, patient) => new Promise((shown) => {
    createRoot(element).render(
      <Form questionnaire={questionnaire} terminologyServerUrl={plugin} patient={patient} onShown={shown}/>);
  }),
  // What the renderer holds, less the empty answers and the answers enableWhen hides, marked final: what the Smart
  // Forms app itself sends on "Save as final" (the renderer's own response stays in-progress).
  response: (questionnaire) => ({
    ...removeEmptyAnswersFromResponse(questionnaire, getResponse()),
    status: "completed",
    authored: new Date().toISOString(),
  }),
});
