// enableWhen for the patient form: a question shows only when its conditions hold; a hidden one is
// disabled, so its answer is not sent. Without this script every question shows, and the server drops
// answers to questions that should have been hidden.
(function () {
  'use strict';
  var form = document.getElementById('screening');
  if (!form) return;

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

  form.addEventListener('change', update);
  form.addEventListener('input', update);
  update();
})();
