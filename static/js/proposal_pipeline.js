// The proposal form's privacy pipeline as ordered steps, each with its parameters.
//
// Progressive enhancement: without this file the pipeline is the JSON box the server reads.
// With it, the steps come first and every change to them is written into the box, which stays
// below them (to copy or paste a pipeline; typing a valid list there redraws the steps). The
// form posts exactly what it posted before, the server checks every value (training.fl.params)
// and its errors still sit next to the box. JSON that is not a list of steps is left as it is,
// for the person to correct.
(function () {
  "use strict";
  const box = document.getElementById("id_privacy_pipeline");
  const schemaEl = document.getElementById("pipeline-schema");
  if (!box || !schemaEl) return;
  const schema = JSON.parse(schemaEl.textContent);
  const boxField = box.closest(".field") || box.parentElement;
  let steps = parse(box.value);
  if (!steps) return;

  function parse(text) {
    try {
      const value = JSON.parse(text || "[]");
      return Array.isArray(value) && value.every((s) => s && typeof s === "object" && !Array.isArray(s))
        ? value
        : null;
    } catch (e) {
      return null;
    }
  }

  function el(tag, props, children) {
    const node = document.createElement(tag);
    Object.assign(node, props || {});
    for (const child of children || []) node.append(child);
    return node;
  }

  const editor = el("div", { className: "pipeline-editor", id: "pipeline-editor" });
  const list = el("ol", { className: "pipeline-steps" });
  const status = el("p", { className: "visually-hidden", role: "status" });
  const addSelect = el("select", { id: "pipeline-add-filter" });
  for (const [name, f] of Object.entries(schema)) {
    addSelect.append(el("option", { value: name, textContent: `${f.label} (${name})` }));
  }
  const addButton = el("button", { type: "button", textContent: "Add this step" });
  const jsonNote = el("p", { className: "helptext", textContent: "The same pipeline as JSON is below: copy it, or paste one there." });
  editor.append(
    el("p", { className: "helptext", textContent: "Each site runs these steps, in this order, on every update before it leaves. The check below says whether the agreement and every institution's budget accept them." }),
    list,
    el("p", { className: "pipeline-add" }, [
      el("label", { htmlFor: "pipeline-add-filter", textContent: "New step: " }),
      addSelect, " ", addButton,
    ]),
    jsonNote,
    status,
  );
  boxField.before(editor);
  let writing = false;

  function write(announce) {
    box.value = "[\n" + steps.map((s) => "  " + JSON.stringify(s)).join(",\n") + "\n]";
    // Tell the form (and the budget check listening on it) that the pipeline changed.
    writing = true;
    box.dispatchEvent(new Event("change", { bubbles: true }));
    writing = false;
    if (announce) status.textContent = announce;
  }

  box.addEventListener("input", () => {
    if (writing) return;
    const parsed = parse(box.value);
    if (parsed) {
      steps = parsed;
      render();
      jsonNote.textContent = "The same pipeline as JSON is below: copy it, or paste one there.";
    } else {
      jsonNote.textContent = "The JSON below is not a list of steps yet: the steps above are the last list it held.";
    }
  });

  function defaults(name) {
    const step = { filter: name };
    for (const p of (schema[name] || { params: [] }).params) {
      if (p.default !== undefined) step[p.key] = p.default;
    }
    return step;
  }

  function readValue(param, input) {
    const raw = input.value.trim();
    if (raw === "") return undefined;
    if (param.kind === "layers") return raw.split(",").map((s) => s.trim()).filter(Boolean);
    if (param.kind === "int" || param.kind === "float") {
      const n = Number(raw);
      return Number.isFinite(n) ? n : raw; // the server names what is wrong with it
    }
    return raw;
  }

  function paramInput(index, step, param) {
    const id = `pipeline-step-${index}-${param.key}`;
    const current = step[param.key];
    let input;
    if (param.kind === "choice") {
      input = el("select", { id });
      for (const c of param.choices) input.append(el("option", { value: c, textContent: c, selected: c === current }));
    } else {
      input = el("input", { id, type: param.kind === "layers" ? "text" : "number" });
      if (param.kind === "float") input.step = "any";
      if (param.kind === "int") input.step = "1";
      if (param.min !== null && param.min !== undefined) input.min = param.min;
      if (param.max !== null && param.max !== undefined) input.max = param.max;
      input.value = current === undefined ? "" : Array.isArray(current) ? current.join(", ") : String(current);
    }
    input.addEventListener("change", () => {
      const value = readValue(param, input);
      if (value === undefined) delete step[param.key];
      else step[param.key] = value;
      write();
    });
    const help = param.kind === "layers" ? "layer names, separated by commas" : param.help || "";
    return el("div", { className: "field" }, [
      el("label", { htmlFor: id, textContent: param.key }),
      help ? el("div", { className: "helptext", textContent: help }) : "",
      input,
    ]);
  }

  function move(index, by) {
    const [step] = steps.splice(index, 1);
    steps.splice(index + by, 0, step);
    render();
    write(`Step ${index + 1} moved to position ${index + by + 1}.`);
    const moved = list.children[index + by];
    if (moved) moved.querySelector("select").focus();
  }

  function render() {
    list.replaceChildren();
    steps.forEach((step, index) => {
      const known = schema[step.filter];
      const filterId = `pipeline-step-${index}-filter`;
      const filterSelect = el("select", { id: filterId });
      for (const [name, f] of Object.entries(schema)) {
        filterSelect.append(el("option", { value: name, textContent: `${f.label} (${name})`, selected: name === step.filter }));
      }
      if (!known) filterSelect.prepend(el("option", { value: step.filter, textContent: String(step.filter), selected: true }));
      filterSelect.addEventListener("change", () => {
        steps[index] = defaults(filterSelect.value);
        render();
        write(`Step ${index + 1} is now ${filterSelect.value}.`);
        list.children[index].querySelector("select").focus();
      });
      const up = el("button", { type: "button", textContent: "Move up", disabled: index === 0 });
      const down = el("button", { type: "button", textContent: "Move down", disabled: index === steps.length - 1 });
      const remove = el("button", { type: "button", textContent: "Remove" });
      // Named with their step, so a screen reader (and a test) can tell them apart.
      up.setAttribute("aria-label", `Move step ${index + 1} up`);
      down.setAttribute("aria-label", `Move step ${index + 1} down`);
      remove.setAttribute("aria-label", `Remove step ${index + 1}`);
      up.addEventListener("click", () => move(index, -1));
      down.addEventListener("click", () => move(index, 1));
      remove.addEventListener("click", () => {
        steps.splice(index, 1);
        render();
        write(`Step ${index + 1} (${step.filter}) removed.`);
      });
      const params = known ? known.params.map((p) => paramInput(index, step, p)) : [];
      list.append(
        el("li", { className: "pipeline-step" }, [
          el("fieldset", { className: "group" }, [
            el("legend", { textContent: `Step ${index + 1}` }),
            el("div", { className: "field" }, [el("label", { htmlFor: filterId, textContent: "Filter" }), filterSelect]),
            el("div", { className: "form-cols" }, params),
            el("p", { className: "step-actions" }, [up, " ", down, " ", remove]),
          ]),
        ]),
      );
    });
    if (!steps.length) {
      list.append(el("li", { className: "muted", textContent: "No step: updates leave the sites unfiltered (most agreements refuse this)." }));
    }
  }

  addButton.addEventListener("click", () => {
    steps.push(defaults(addSelect.value));
    render();
    write(`Step ${steps.length} (${addSelect.value}) added.`);
  });

  render();
})();
