// The patient form's behaviour; the form works without it (the server does each of these again).
// - enableWhen: a question shows only when its conditions hold; a hidden one is disabled, so its answer is not sent.
// - Red flags: a Yes shows what to do at once, below the red-flag questions, and sends the answers so far
//   (an in-progress response) so they reach the care team even if the patient stops there.
// - Numbers out of range are named beside the field, in the words the server would use, before sending.
// - A form is sent once: a double click does not send it twice.
(function () {
  'use strict';
  var form = document.getElementById('screening');
  if (!form) return;
  var sending = false;
  var sentOnce = false;  // the answers so far were sent once: keep the stored copy up to date

  function current(name) {
    var inputs = form.querySelectorAll('[name="' + name + '"]');
    for (var i = 0; i < inputs.length; i++) {
      var input = inputs[i];
      if (input.disabled) continue;
      if (input.type === 'radio') { if (input.checked) return parse(input.value); }
      else if (input.value !== '') return parse(input.value);
    }
    return null;
  }

  function parse(value) {
    if (value === 'true') return true;
    if (value === 'false') return false;
    var number = Number(value);
    return value.trim() !== '' && !isNaN(number) ? number : value;
  }

  function holds(condition) {
    var value = current(condition.question);
    if (condition.operator === 'exists') return (value !== null) === condition.answer;
    if (value === null) return false;
    switch (condition.operator) {
      case '=': return value === condition.answer;
      case '!=': return value !== condition.answer;
      case '>': return value > condition.answer;
      case '<': return value < condition.answer;
      case '>=': return value >= condition.answer;
      case '<=': return value <= condition.answer;
    }
    return false;
  }

  function update() {
    var conditional = form.querySelectorAll('[data-enable-when]');
    for (var i = 0; i < conditional.length; i++) {
      var element = conditional[i];
      var conditions = JSON.parse(element.getAttribute('data-enable-when'));
      var all = element.getAttribute('data-enable-all') !== 'false';
      var results = conditions.map(holds);
      var enabled = all ? results.every(Boolean) : results.some(Boolean);
      element.hidden = !enabled;
      var inputs = element.querySelectorAll('input, select, textarea');
      for (var j = 0; j < inputs.length; j++) inputs[j].disabled = !enabled;
    }
  }

  // The most severe red flag answered Yes: 'emergency', 'urgent' or null.
  function flagged() {
    var worst = null;
    var flags = form.querySelectorAll('[data-urgency]');
    for (var i = 0; i < flags.length; i++) {
      var yes = flags[i].querySelector('input[value="true"]:checked');
      if (!yes) continue;
      var urgency = flags[i].getAttribute('data-urgency');
      if (urgency === 'emergency') return urgency;
      worst = urgency;
    }
    return worst;
  }

  function showAdvice(urgency) {
    var box = document.getElementById('flag-advice');
    if (!box || document.getElementById('advice-now')) return null;  // the server already shows it at the top
    box.hidden = urgency === null;
    var sections = box.querySelectorAll('[data-advice]');
    var shown = null;
    for (var i = 0; i < sections.length; i++) {
      sections[i].hidden = sections[i].getAttribute('data-advice') !== urgency;
      if (!sections[i].hidden) shown = sections[i];
    }
    return shown;
  }

  function saveProgress(section) {
    var url = form.getAttribute('data-progress');
    var status = section && section.querySelector('[data-progress-status]');
    if (!url || !window.fetch) return;
    var body = new URLSearchParams(new FormData(form));
    body.delete('stage');
    if (status) status.textContent = 'Sending your answers so far to your care team…';
    fetch(url, {method: 'POST', body: body, credentials: 'same-origin'})
      .then(function (answer) { return answer.ok ? answer.json() : {saved: false}; })
      .catch(function () { return {saved: false}; })
      .then(function (result) {
        if (!status) return;
        status.textContent = result.saved ? 'Your answers so far have been sent to your care team.'
          : 'Your answers could not be sent just now: please follow the advice above and show this page to your care team.';
      });
  }

  function onFlag(event) {
    var question = event.target.closest && event.target.closest('[data-urgency]');
    if (!question) return;
    var urgency = flagged();
    var box = document.getElementById('flag-advice');
    // Right under the Yes just given, where the patient is looking; it stays before the rest of the form.
    if (box && event.target.value === 'true') question.insertAdjacentElement('afterend', box);
    var section = showAdvice(urgency);
    // Once a flag was Yes, every later change is sent too, so the care team sees the answers as they stand.
    if (urgency !== null || sentOnce) { sentOnce = true; saveProgress(section); }
  }

  function validate(input) {
    var message = document.getElementById('err-' + input.name);
    var wrong = !input.disabled && !input.validity.valid;
    if (message) message.hidden = !wrong;
    if (wrong) input.setAttribute('aria-invalid', 'true'); else input.removeAttribute('aria-invalid');
    var question = input.closest('.question');
    if (question) question.classList.toggle('invalid', wrong);
    return !wrong;
  }

  function numbers() { return form.querySelectorAll('input[type="number"]'); }

  form.addEventListener('change', function (event) {
    update();
    onFlag(event);
    if (event.target.type === 'number') validate(event.target);
  });
  form.addEventListener('input', update);
  form.addEventListener('submit', function (event) {
    if (sending) { event.preventDefault(); return; }
    var first = null;
    var inputs = numbers();
    for (var i = 0; i < inputs.length; i++) if (!validate(inputs[i]) && !first) first = inputs[i];
    if (first) { event.preventDefault(); first.focus(); return; }
    sending = true;  // later clicks do nothing; the button says so
    var button = document.getElementById('send');
    if (button) { button.setAttribute('aria-disabled', 'true'); button.textContent = 'Sending…'; }
  });
  // With this script, the red-flag advice comes by itself: the no-script button would only get in the way
  // (and, as the first button, would be what Enter presses).
  var extras = form.querySelectorAll('.no-script');
  for (var k = 0; k < extras.length; k++) extras[k].parentNode.removeChild(extras[k]);
  update();
  showAdvice(flagged());
})();
