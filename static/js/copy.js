// "Copy" buttons for what is shown once (a worker's token, an invitation link): a button with
// data-copy-text (the text itself) or data-copy-from (the id of the element whose text to copy).
// Hidden until this script runs, so a page without JavaScript shows no button that does nothing.
(function () {
  "use strict";

  function textOf(button) {
    if (button.dataset.copyText !== undefined) return button.dataset.copyText;
    const source = document.getElementById(button.dataset.copyFrom);
    return source ? source.textContent.trim() : "";
  }

  function fallbackCopy(text) {
    // No Clipboard API (an insecure origin): copy through a selected, off-screen text area.
    const area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.style.position = "absolute";
    area.style.left = "-9999px";
    document.body.appendChild(area);
    area.select();
    const copied = document.execCommand("copy");
    area.remove();
    return copied ? Promise.resolve() : Promise.reject(new Error("copy refused"));
  }

  function copy(button) {
    const text = textOf(button);
    const status = document.getElementById(button.getAttribute("aria-describedby")) || button;
    const done = navigator.clipboard && window.isSecureContext
      ? navigator.clipboard.writeText(text)
      : fallbackCopy(text);
    done.then(
      () => { status.textContent = "Copied."; },
      () => { status.textContent = "Could not copy: select the text and copy it by hand."; },
    );
  }

  document.querySelectorAll("button[data-copy-text], button[data-copy-from]").forEach((button) => {
    button.hidden = false;
    button.addEventListener("click", () => copy(button));
  });
})();
